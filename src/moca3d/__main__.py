"""`python -m moca3d <verb>`: the same CLI as the `moca3d` command."""

from moca3d.cli import main

main()
