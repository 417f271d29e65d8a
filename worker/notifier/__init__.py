"""The notification consumer: turns ``code.issued`` events into e-mails and text messages."""
