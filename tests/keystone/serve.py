"""Serves a real Keystone (installed from PyPI) for tests/tests/keystone_auth.rs.

Usage: python serve.py PORT CONFIG_FILE

Keystone's WSGI application (keystone.server.wsgi) under the standard library's threaded
WSGI server: enough for a test, no uwsgi or Apache needed.
"""
import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

os.environ["OS_KEYSTONE_CONFIG_FILES"] = sys.argv[2]
port = int(sys.argv[1])
sys.argv = sys.argv[:1]  # oslo.config reads the command line

from keystone.server import wsgi  # noqa: E402


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


app = wsgi.initialize_public_application()
make_server("127.0.0.1", port, app, server_class=Server, handler_class=Quiet).serve_forever()
