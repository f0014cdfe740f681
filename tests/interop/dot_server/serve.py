"""Start the DOT project: migrate a fresh SQLite file, create the test users and
the broker's Application, then serve on 127.0.0.1 and write the port to a file.

Environment: ``DOT_DB_PATH``, ``DOT_RECORD_PATH``, ``DOT_PORT_FILE``,
``DOT_USERS`` (comma-separated), ``DOT_PASSWORD``, ``DOT_CLIENT_ID``,
``DOT_CLIENT_SECRET``, ``DOT_REDIRECT_URI``, ``DOT_ACCESS_TOKEN_SECONDS``.
Run from the repository root: ``python -m tests.interop.dot_server.serve``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["main"]


def _prepare() -> None:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from oauth2_provider.models import get_application_model

    call_command("migrate", verbosity=0, interactive=False)
    users = get_user_model()
    password = os.environ["DOT_PASSWORD"]
    for name in filter(None, os.environ.get("DOT_USERS", "").split(",")):
        users.objects.create_user(username=name, password=password)
    application = get_application_model()
    application.objects.create(
        name="credential-broker",
        client_id=os.environ["DOT_CLIENT_ID"],
        client_secret=os.environ["DOT_CLIENT_SECRET"],  # hashed by DOT on save
        client_type=application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=os.environ["DOT_REDIRECT_URI"],
        skip_authorization=True,  # the signed-in user gets the code without a consent page
    )


def _enable_wal() -> None:
    from django.db.backends.signals import connection_created

    def wal(sender: object, connection: object, **kwargs: object) -> None:
        with connection.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode=WAL")

    connection_created.connect(wal)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.interop.dot_server.settings")
    import django

    django.setup()
    _enable_wal()
    _prepare()
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.core.wsgi import get_wsgi_application

    server = ThreadedWSGIServer(("127.0.0.1", 0), WSGIRequestHandler, ipv6=False)
    server.set_app(get_wsgi_application())
    port_file = Path(os.environ["DOT_PORT_FILE"])
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(port_file)  # atomic: the test never reads half a number
    server.serve_forever()


if __name__ == "__main__":
    main()
