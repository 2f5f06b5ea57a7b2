"""Who may operate the appliance: users (argon2id passwords), API tokens, and the
web side (login sessions, CSRF) in ``appliance/web/auth.py``."""
