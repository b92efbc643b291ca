"""Private implementation of mac_optax; import from `mac_optax` instead."""
