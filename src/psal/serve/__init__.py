"""``psal serve``: the four image tasks of the ``psal`` command in a local web page, and the HTTP
API behind it (:mod:`psal.serve.app`, which lists the endpoints).

The page (``static/``: plain HTML, JavaScript and CSS, nothing fetched from elsewhere) opens a
picture, paints the mask, runs a task with a progress bar, compares before and after and
downloads the full-resolution result. Jobs run one at a time on the device
(:mod:`psal.serve.jobs`) through the command line's own code (:mod:`psal.tasks`), so that the
same pictures and seed give the same bytes as the command.

Needs the ``serve`` extra (``pip install 'psal[serve]'``: Starlette, uvicorn, python-multipart);
``import psal`` and this package's ``import`` do not.
"""

from .server import BackgroundServer, require, run_server

__all__ = ["BackgroundServer", "require", "run_server"]
