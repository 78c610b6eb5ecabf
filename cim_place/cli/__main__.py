"""`python -m cim_place.cli`: the same as the `cim-place` console script."""

from cim_place.cli.app import main

main()
