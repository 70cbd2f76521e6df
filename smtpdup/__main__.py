"""`python -m smtpdup`: the same as the `smtpdup` console script."""

from .cli import main

main()
