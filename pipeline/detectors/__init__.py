"""Face detectors: one module per family, a shared registry, sha256-checked weights."""
