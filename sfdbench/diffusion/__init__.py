"""The math of diffusion sampling: denoiser wrappers, noise schedules, ODE solvers. No I/O."""
