"""Django settings: django-oauth-toolkit as a strict, rotating authorization server.

Every knob the tests depend on comes from the environment, so one process can
be started per test with its own database, recorder file and token lifetime.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DOT_DJANGO_SECRET", "interop-tests-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "tests.interop.dot_server.urls"
WSGI_APPLICATION = None
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "oauth2_provider",
]

MIDDLEWARE = [
    "tests.interop.dot_server.recorder.RecorderMiddleware",  # outermost: sees what DOT answered
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [os.path.join(os.path.dirname(__file__), "templates")],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                       "django.contrib.auth.context_processors.auth"]},
}]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DOT_DB_PATH", ":memory:"),
        "OPTIONS": {"timeout": 20},
    }
}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast start; test users only
LOGIN_URL = "/accounts/login/"

OAUTH2_PROVIDER = {
    "SCOPES": {"read": "Read", "write": "Write"},
    "DEFAULT_SCOPES": ["read"],
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("DOT_ACCESS_TOKEN_SECONDS", "30")),
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 60,
    # Each refresh returns a new refresh token and retires the old one at once;
    # presenting a retired one revokes the whole family (RFC 9700 §4.14.2).
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "PKCE_REQUIRED": True,
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,  # S256 only
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,  # only checksums of tokens at rest
    "REQUEST_APPROVAL_PROMPT": "auto",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    # Request lines carry authorization codes in query strings: warnings only.
    "loggers": {"django.server": {"handlers": ["stderr"], "level": "ERROR"},
                "oauth2_provider": {"handlers": ["stderr"], "level": "WARNING"}},
}
