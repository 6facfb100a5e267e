"""The implementation of flora_jax; import the public names from flora_jax."""
