"""`python -m clusterctl` is `clusterctl` (for environments whose scripts are not on PATH)."""

from clusterctl.cli import main

main()
