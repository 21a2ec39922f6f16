"""Fused GPU SSIM feature loss (Triton). Not written yet: never selected."""


def is_available() -> bool:
    return False
