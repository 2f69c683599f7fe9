"""Sub-commands of the `trainer` command line, one module each.

Every module exposes `register(subparsers)`, which adds its parser and sets `handler`
to a function taking the parsed namespace and returning the exit status.
"""
