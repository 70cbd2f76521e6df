"""smtpdup: an SMTP relay that duplicates mail for mail-server migrations."""

__version__ = "0.1.0"
