"""dpg_jax: DPG personalization of Stable Diffusion (ECCV 2024) in JAX/Flax."""
__version__ = '0.1.0'
