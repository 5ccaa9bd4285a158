"""Plumbing both packages share: the one user-error type, the CLI error boundary, typed-dataclass
validation of TOML, and atomic file writes. Torch-free and cheap to import (clusterctl's fast path)."""
