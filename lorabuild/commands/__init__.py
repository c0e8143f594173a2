"""What each ``lorabuild`` subcommand runs; ``cli.py`` parses the arguments and calls them.
The dashboard is ``lorabuild/serve/`` (a package of its own, with its static files)."""
