"""The Serve application of `digits serve`: one deployment, DigitServer, whose replicas each load
the model(s) once and answer HTTP:

    GET  /             the drawing page (page.html: plain HTML and JavaScript, nothing fetched elsewhere)
    GET  /health       {"status": "ok"}
    GET  /model        the run(s), their run.json summaries, the test-time augmentation
    POST /predict      {"images": [...]} -> {"labels": [...], "probabilities": [[10 floats], ...]}
    POST /predict.csv  a Kaggle test.csv -> ImageId,Label

A bad request gets 400 and {"error": "<one line>"}; the replica goes on serving. The images of
concurrent requests go through the model together (@serve.batch): on 2 CPUs one model call on
32 requests' images costs little more than one on a single image's."""

from __future__ import annotations

import asyncio
from importlib.resources import files

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from digit_models.errors import DigitsError, first_line
from digit_models.scoring.ensemble import Ensemble
from digit_models.serving.bodies import (
    CSV_TYPE,
    JSON_TYPE,
    MAX_BODY_BYTES,
    answer_csv,
    answer_json,
    images_of_csv,
    images_of_json,
)

APP_NAME = "digits"
# The page may run its own script and talk to this server; it can fetch nothing from elsewhere.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'"
)


@serve.deployment(name="DigitServer")
class DigitServer:
    def __init__(
        self,
        models: list[bytes],
        names: list[str],
        description: dict,
        cpus: float,
        max_batch_size: int,
        batch_wait_s: float,
    ):
        from digit_models.runtime.tf_setup import configure_tensorflow

        configure_tensorflow(max(1, int(cpus)))
        self.ensemble = Ensemble(models, names, tta=description["tta_extra_views"])
        self.description = description
        self.page_html = files("digit_models.serving").joinpath("page.html").read_bytes()
        self.scored.set_max_batch_size(max_batch_size)
        self.scored.set_batch_wait_timeout_s(batch_wait_s)

    async def __call__(self, request: Request) -> Response:
        route = ROUTES.get(request.url.path)
        if route is None:
            return JSONResponse({"error": f"no such path {request.url.path}"}, status_code=404)
        method, handler = route
        if request.method != method:
            return JSONResponse({"error": f"{request.url.path} takes {method}"}, status_code=405)
        try:
            return await getattr(self, handler)(request)
        except DigitsError as exc:
            return JSONResponse({"error": first_line(exc)}, status_code=400)

    async def page(self, request: Request) -> Response:
        return Response(self.page_html, media_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def model(self, request: Request) -> Response:
        return JSONResponse(self.description)

    async def predict(self, request: Request) -> Response:
        images = images_of_json(await _body(request, JSON_TYPE))
        return JSONResponse(answer_json(await self.scored(images)))

    async def predict_csv(self, request: Request) -> Response:
        images = images_of_csv(await _body(request, CSV_TYPE))
        return PlainTextResponse(answer_csv(await self.scored(images)), media_type=CSV_TYPE)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)  # set again by __init__
    async def scored(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """The probabilities of each request's images, from one model call on all of them. In
        a thread: the replica goes on reading and checking the next requests meanwhile."""
        probabilities = await asyncio.to_thread(self.ensemble.probabilities, np.concatenate(requests))
        ends = np.cumsum([len(images) for images in requests])
        return np.split(probabilities, ends[:-1])


# Path: (method, DigitServer's method that answers it).
ROUTES = {
    "/": ("GET", "page"),
    "/health": ("GET", "health"),
    "/model": ("GET", "model"),
    "/predict": ("POST", "predict"),
    "/predict.csv": ("POST", "predict_csv"),
}


async def _body(request: Request, content_type: str) -> bytes:
    """The body, if of this content type and at most MAX_BODY_BYTES (checked on the declared
    length first, then while reading, for a body sent in chunks)."""
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given != content_type:
        raise DigitsError(f"Content-Type {given or '(none)'}: {request.url.path} takes {content_type}")
    limit = f"body over the limit of {MAX_BODY_BYTES:,} bytes"
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
        raise DigitsError(f"{limit} (Content-Length {declared[:20]})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise DigitsError(limit)
    return bytes(body)


def application(models: list[bytes], names: list[str], description: dict, config):
    """The application for serve.run: `config` (a ServeConfig) sizes the replicas and batching."""
    return DigitServer.options(
        num_replicas=config.replicas,
        # Enough requests in each replica at once to fill a batch while the previous one is scored.
        max_ongoing_requests=2 * config.max_batch_size,
        ray_actor_options={
            "num_cpus": config.cpus_per_replica,
            **({"num_gpus": config.gpus_per_replica} if config.gpus_per_replica else {}),
        },
    ).bind(models, names, description, config.cpus_per_replica, config.max_batch_size, config.batch_wait_s)
