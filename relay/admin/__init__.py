"""The web admin: server-rendered pages (aiohttp + aiohttp-jinja2) on the relay's own event loop."""
