"""The HTTP server: app factory (the one place backends are wired), thin routers, auth, web page.

``create_app`` builds the FastAPI app (also a uvicorn factory); ``serve`` runs it, refusing a
non-loopback bind without auth. The SDK and CLI never import this package.
"""

from shipyard.server.app import create_app, serve

__all__ = ["create_app", "serve"]
