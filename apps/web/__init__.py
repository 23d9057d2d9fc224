"""The browser pages: a chat page over ``/v1/chat/completions`` (``nvila-edge serve BUNDLE --ui``) and a live
camera page (``nvila-edge camera BUNDLE --source S --web``).

Plain HTML + JS in ``static/`` (no build step, no third-party script), served by the FastAPI apps; the
security rules of both live in ``security`` (loopback by default, a Bearer key for anything else, a strict
Content-Security-Policy). fastapi is imported only when a page is served (extra ``server``).
"""
