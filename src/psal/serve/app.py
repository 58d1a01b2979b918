"""The web application of ``psal serve`` (Starlette): the page at ``/`` and the API under ``/api``.

Every task endpoint takes a ``multipart/form-data`` request and answers ``image/png``:

    POST /api/inpaint      image, mask (white = fill)      [seed]
    POST /api/upscale      image, scale (2, 3 or 4)        [method: network|patch, steps, seed]
    POST /api/colorize     image, reference (colour)       [seed]
    POST /api/reconstruct  image (the query), source       [seed]

Any of them also takes ``job``, an id of the client's choosing (letters, digits, ``-``, ``_``):
``GET /api/jobs/{job}`` then gives its progress while the request waits for its answer.
``GET /api/health`` and ``GET /api/jobs`` (the queue's counts) answer JSON.

A request goes through three steps, each in one place. :func:`_read_form` checks the request and
its fields (content type and length, missing, unknown, repeated or malformed fields). The task's
``prepare`` function decodes the pictures with the command line's reader (:mod:`psal.tasks.files`)
and checks them with its checks (:mod:`psal.tasks`), in a worker thread of the event loop's
pool: a picture over ``max_pixels`` is refused from its header, before any job starts. The job it
returns calls the same task function as the command line, with the same defaults, on the queue's
single worker thread (:mod:`psal.serve.jobs`), and encodes the PNG as the command line writes it:
the same pictures and seed give the same bytes as ``psal inpaint IMAGE MASK -o OUT.png --seed S``.
Every problem is answered by :func:`_error_response`: a 4xx (or 5xx) status and ``{"error": one
line}``; the log keeps the traceback of an unexpected error, the client never sees one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import psal
from psal import tasks
from psal.tasks.files import InputError, TooLargeError, decode_image_bits, encode_png

from .jobs import JOB_ID, BusyError, JobInUseError, JobQueue, StoppingError

STATIC = pathlib.Path(__file__).with_name("static")
log = logging.getLogger("psal.serve")

# How often a request waiting for its job checks that its client is still there.
_DISCONNECT_POLL_S = 0.5

# A request body may hold two pictures of up to 8 bytes per pixel (16-bit RGBA, uncompressed),
# plus this much for the multipart framing and the small fields.
_BODY_SLACK = 32 << 20


class BadRequestError(Exception):
    """A problem with the request, answered with ``status`` and the message as its one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------
# Fields: the parsers of the text fields, and what each endpoint takes.


def _integer(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise BadRequestError(400, f"{name} must be an integer from {lo} to {hi}, got {text[:40]!r}")
        return value

    return parse


def _choice(*choices) -> Callable[[str, str], object]:
    def parse(name: str, text: str):
        for choice in choices:
            if text.strip() == str(choice):
                return choice
        raise BadRequestError(400, f"{name} must be one of {', '.join(map(str, choices))}, got {text[:40]!r}")

    return parse


_SEED = _integer(0, 2**63 - 1)


@dataclass(frozen=True)
class _Endpoint:
    """One task: its picture fields, its text fields (required and optional, with their parsers)
    and ``prepare(fields, service) -> job``, which decodes and checks everything and returns the
    job, ``job(progress) -> PNG bytes``."""

    pictures: tuple[str, ...]
    prepare: Callable
    required: dict = field(default_factory=dict)
    optional: dict = field(default_factory=lambda: {"seed": _SEED})


@dataclass
class _Fields:
    """A request's fields, checked: the pictures' bytes, the text fields' values (only those given,
    so that the task's own defaults apply to the others) and the job id, if any."""

    pictures: dict
    options: dict
    job: str | None


async def _read_form(request: Request, endpoint: _Endpoint, max_body: int | None) -> _Fields:
    """The fields of a task request, or :class:`BadRequestError` for the first problem."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise BadRequestError(415, f"send the fields as multipart/form-data, not {kind or 'no content type'}")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise BadRequestError(411, "the request needs a Content-Length")
    if max_body is not None and int(length) > max_body:
        raise BadRequestError(413, f"the request is {int(length)} bytes, more than the {max_body} allowed")
    known = set(endpoint.pictures) | set(endpoint.required) | set(endpoint.optional) | {"job"}
    pictures, options, job = {}, {}, None
    async with request.form(max_files=len(endpoint.pictures) + 2, max_fields=len(known) + 2) as form:
        for name in form:
            if name not in known:
                raise BadRequestError(400, f"unknown field {name[:40]!r}; this endpoint takes {', '.join(sorted(known))}")
            if len(form.getlist(name)) > 1:
                raise BadRequestError(400, f"field {name!r} is given more than once")
        for name in endpoint.pictures:
            value = form.get(name)
            if value is None:
                raise BadRequestError(400, f"missing field {name!r} (a picture file)")
            if not isinstance(value, UploadFile):
                raise BadRequestError(400, f"field {name!r} must be a file upload, not text")
            pictures[name] = await value.read()
        for name, parse in {**endpoint.required, **endpoint.optional}.items():
            value = form.get(name)
            if value is None:
                if name in endpoint.required:
                    raise BadRequestError(400, f"missing field {name!r}")
                continue
            if isinstance(value, UploadFile):
                raise BadRequestError(400, f"field {name!r} must be text, not a file")
            options[name] = parse(name, value)
        if "job" in form:
            given = form["job"]
            if not isinstance(given, str) or not JOB_ID.fullmatch(given):
                raise BadRequestError(400, "field 'job' must be 1 to 64 letters, digits, '-' or '_'")
            job = given
    return _Fields(pictures, options, job)


# ----------------------------------------------------------------------------------------------
# The tasks: decode and check (in the pool of the event loop), then the job (on the queue).


@dataclass(frozen=True)
class _Service:
    device: torch.device
    max_pixels: int | None

    def picture(self, fields: _Fields, name: str):
        """``(tensor, bits)`` of the picture field ``name``, decoded as the command line reads files."""
        return decode_image_bits(fields.pictures[name], name, self.max_pixels)


def _inpaint(fields: _Fields, service: _Service):
    image, bits = service.picture(fields, "image")
    mask, _ = service.picture(fields, "mask")
    hole = tasks.hole_from_mask(mask, image)

    def job(progress):
        out = tasks.inpaint_image(image, hole, device=service.device, progress=progress, **fields.options)
        return encode_png(out, bits)

    return job


def _upscale(fields: _Fields, service: _Service):
    options = dict(fields.options)
    scale = options.pop("scale")
    image, bits = service.picture(fields, "image")
    H, W = image.shape[-2:]
    tasks.check_upscale_fits(H, W, scale, options.get("method", tasks.default(tasks.upscale_image, "method")), service.max_pixels)

    def job(progress):
        out = tasks.upscale_image(image, scale, device=service.device, progress=progress, **options)
        return encode_png(out, bits)

    return job


def _colorize(fields: _Fields, service: _Service):
    gray, _ = service.picture(fields, "image")
    reference, _ = service.picture(fields, "reference")
    tasks.check_reference(reference, "reference")

    def job(progress):
        out = tasks.colorize_image(gray, reference, device=service.device, progress=progress, **fields.options)
        return encode_png(out)  # 8 bits, as psal colorize writes it

    return job


def _reconstruct(fields: _Fields, service: _Service):
    query, bits = service.picture(fields, "image")
    source, _ = service.picture(fields, "source")

    def job(progress):
        out, _ = tasks.reconstruct_images(query, source, device=service.device, progress=progress, **fields.options)
        return encode_png(out, bits)

    return job


ENDPOINTS = {
    "inpaint": _Endpoint(("image", "mask"), _inpaint),
    "upscale": _Endpoint(
        ("image",),
        _upscale,
        required={"scale": _choice(2, 3, 4)},
        optional={"seed": _SEED, "method": _choice("network", "patch"), "steps": _integer(1, 100_000)},
    ),  # fmt: skip
    "colorize": _Endpoint(("image", "reference"), _colorize),
    "reconstruct": _Endpoint(("image", "source"), _reconstruct),
}


# ----------------------------------------------------------------------------------------------
# Errors: one place that turns every exception into a status and one line.


def _one_line(message) -> str:
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text[:400] or "error"


class _ClientGoneError(Exception):
    """The client went away before its answer was ready."""


async def _result_while_connected(request: Request, jobs: JobQueue, job_id: str, future):
    """The job's result; if the client disconnects first, the job is cancelled (it never starts,
    or stops at its next progress report) and :class:`_ClientGoneError` is raised."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=_DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            jobs.cancel(job_id)
            waiting.cancel()
            raise _ClientGoneError


def _error_response(exc: BaseException) -> JSONResponse:
    if isinstance(exc, BadRequestError):
        status, message = exc.status, str(exc)
    elif isinstance(exc, TooLargeError):
        status, message = 413, str(exc)
    elif isinstance(exc, (InputError, ValueError, TypeError)):  # the command line's exit 2: bad input
        status, message = 400, str(exc)
    elif isinstance(exc, JobInUseError):
        status, message = 409, str(exc)
    elif isinstance(exc, (BusyError, StoppingError)):
        status, message = 503, str(exc)
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
    elif isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        status, message = 500, "out of memory; try a smaller picture"
    else:
        log.error("psal serve: unexpected error", exc_info=exc)
        status, message = 500, f"{type(exc).__name__}: {exc}"
    return JSONResponse({"error": _one_line(message)}, status_code=status)


# ----------------------------------------------------------------------------------------------


def create_app(device: str | torch.device = "auto", max_pixels: int | None = None, *, max_waiting: int = 16) -> Starlette:
    """The application: ``device`` as ``psal --device`` takes it; pictures (and upscaled results)
    of more than ``max_pixels`` pixels are refused with 413 (``None``: what the memory available allows, :func:`psal.tasks.memory_pixels`);
    at most ``max_waiting`` jobs wait, further requests get 503. ``app.state.jobs`` is the
    :class:`~psal.serve.jobs.JobQueue`."""
    device = device if isinstance(device, torch.device) else tasks.device_from_name(device)
    if max_pixels is None:
        max_pixels = tasks.memory_pixels()
    elif isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"create_app: max_pixels must be a positive int or None, got {max_pixels!r}")
    service = _Service(device, max_pixels)
    jobs = JobQueue(max_waiting=max_waiting)
    max_body = None if max_pixels is None else _BODY_SLACK + 2 * 8 * max_pixels

    def task(endpoint: _Endpoint):
        async def answer(request: Request) -> Response:
            try:
                fields = await _read_form(request, endpoint, max_body)
                jobs.check_room()  # a full queue: 503 before any picture is decoded
                job_fn = await run_in_threadpool(endpoint.prepare, fields, service)
                job, future = jobs.submit(job_fn, fields.job)
                png = await _result_while_connected(request, jobs, job.id, future)
            except (ClientDisconnect, _ClientGoneError):  # nobody to answer: no error to log either
                return Response(status_code=499)
            except Exception as exc:
                return _error_response(exc)
            return Response(png, media_type="image/png", headers={"X-Psal-Job": job.id})

        return answer

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": psal.__version__, "device": str(device), "max_pixels": max_pixels})

    async def queue_stats(request: Request) -> Response:
        return JSONResponse(jobs.stats())

    async def job_status(request: Request) -> Response:
        status = jobs.status(request.path_params["job"])
        if status is None:
            return JSONResponse({"error": f"no job {request.path_params['job'][:64]!r}"}, status_code=404)
        return JSONResponse(status)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error_response(exc)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        jobs.close()

    routes = [
        Route("/", page),
        Route("/api/health", health),
        Route("/api/jobs", queue_stats),
        Route("/api/jobs/{job}", job_status),
        *(Route(f"/api/{name}", task(endpoint), methods=["POST"]) for name, endpoint in ENDPOINTS.items()),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers: dict[Any, Any] = {HTTPException: http_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.jobs = jobs
    app.state.device = device
    app.state.max_pixels = max_pixels
    return app
