"""`python -m server` is the `quiver` command."""

from server.cli import main

raise SystemExit(main())
