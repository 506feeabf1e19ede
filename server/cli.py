"""`sd3-server`: serve, generate one image, manage keys and credits.

Every flag has an environment twin (SD3_...) through `Settings`; a flag left out keeps the
environment's (or the default) value. Messages for people go to standard error; what scripts
read (a new key, a balance) goes to standard output. User data (key names, amounts, values from
the environment) is printed as rich `Text`, never as markup: a key named "acme[prod]" or "[/]"
would otherwise be read as style tags, and fail or vanish.
"""

from __future__ import annotations

import contextlib
import socket
import time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from server.config import Settings
from server.credits import InvalidAmount, format_credits, parse_credits
from server.flags import SettingsFlags, build_settings, setting_option
from server.logs import configure_logging, quiet_import_narrators

if TYPE_CHECKING:
    from pipelines.request import GenerationRequest

app = typer.Typer(
    help="Self-hosted Stable Diffusion 3 Medium with Segmind's txt2img API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list, enable and disable API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Add credits to a key.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
db_app = typer.Typer(help="The ledger database's schema: migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

err = Console(stderr=True)
out = Console()

# The ledger's location, for the commands that take only it; `serve` and `generate` take every
# setting they use through `SettingsFlags`.
DataDir = Annotated[Path | None, setting_option("data_dir")]
DatabaseUrl = Annotated[str | None, setting_option("database_url")]
# serve: every setting. generate: what loading and sampling read (it writes its JPEGs at the default
# quality, as it always has).
SERVE_FLAGS = SettingsFlags()
GENERATE_FLAGS = SettingsFlags(
    only=("data_dir", "model", "sampling", "memory", "performance"), leave_out=("performance.jpeg_quality",)
)


def _check_storage(settings: Settings, *, data_dir: bool) -> None:
    """Exit 2 with one sentence when the data folder (if `data_dir`) or the SQLite ledger is unusable."""
    from server.data_dir import StorageUnusable, check_data_dir, check_database_path

    try:
        if data_dir:
            check_data_dir(settings)
        check_database_path(settings)
    except StorageUnusable as exc:
        err.print(Text(str(exc), style="red"))  # paths are text, not markup
        raise typer.Exit(2) from None


def _fail(message: str) -> None:
    # soft_wrap: one line whatever the terminal's width, so that logs and scripts see one sentence.
    err.print(Text(message, style="red"), soft_wrap=True)


def _upgrade(settings: Settings) -> str:
    """Bring the database to the latest schema (this process's start-up); the revision it is at."""
    from server.db.migrations import upgrade_to_head

    _check_storage(settings, data_dir=False)
    try:
        status = upgrade_to_head(settings.resolved_database_url)
    except RuntimeError as exc:  # a database migrated by a newer release
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    assert status.current is not None  # at the head revision now
    return status.current


def _ledger(settings: Settings):  # type: ignore[no-untyped-def]
    from server.ledger import Ledger

    _upgrade(settings)
    return Ledger(settings.resolved_database_url)


def _load_runtime(settings: Settings):  # type: ignore[no-untyped-def]
    from pipelines.loading import ModelLoadError
    from server.runtime import load_runtime

    # A plain line too: the spinner shows only on a terminal, and a load takes seconds to minutes.
    if not err.is_terminal:
        err.print(Text(f"Loading the model {settings.model.id} …"))
    with err.status(f"Loading {settings.model.id} …"):
        try:
            return load_runtime(settings)
        except ModelLoadError as exc:
            err.print(f"[red]Cannot load the model:[/red] {exc}")
            raise typer.Exit(2) from None


@app.command(cls=SERVE_FLAGS.command)
@SERVE_FLAGS
def serve(
    settings: Settings,
    ray: Annotated[
        bool, typer.Option("--ray", help="Serve with Ray Serve: one replica per GPU (the `ray` extra)")
    ] = False,
    replicas: Annotated[
        int, typer.Option(min=1, help="With --ray: number of replicas (one GPU each when GPUs exist)")
    ] = 1,
    ray_address: Annotated[
        str | None, typer.Option(help="With --ray: a Ray cluster to join [RAY_ADDRESS]")
    ] = None,
) -> None:
    """Serve POST /v1/stable-diffusion-3-medium-txt2img on HOST:PORT (until Ctrl+C)."""
    import uvicorn

    from server.app import create_app
    from server.connections import TooFewDescriptors, ensure_descriptors, uvicorn_config
    from server.instance_lock import InstanceBusy, instance_lock

    configure_logging(level=settings.log_level, fmt=settings.log_format)
    # Before the model: the tiny model, outputs and the ledger are all written there.
    _check_storage(settings, data_dir=True)
    if ray:
        # Each replica loads its own model, so the driver does not.
        try:
            from server.ray_app import ScaleOptions, run_ray
        except ImportError:
            err.print("[red]--ray needs the `ray` extra:[/red] pip install 'sd3-server[ray]'")
            raise typer.Exit(2) from None
        run_ray(settings, ScaleOptions(replicas=replicas), address=ray_address)
        return
    try:
        ensure_descriptors(settings.connections)
    except TooFewDescriptors as exc:
        err.print(Text(str(exc), style="red"))
        raise typer.Exit(2) from None
    config = uvicorn_config(None, settings)
    url = f"http://{settings.host}:{settings.port}"
    with contextlib.ExitStack() as held:
        # Both before anything is recovered (in the app's lifespan) and before the model loads, so
        # that a second server on this folder or port exits at once and touches nothing.
        try:
            held.enter_context(instance_lock(settings.data_dir, settings.resolved_instance_id, listening=url))
        except InstanceBusy as exc:
            err.print(Text(str(exc), style="red"))
            raise typer.Exit(2) from None
        try:
            sock = held.enter_context(_bound_socket(settings.host, settings.port))
        except OSError as exc:
            err.print(
                Text(
                    f"Cannot listen on {settings.host}:{settings.port} ({exc.strerror}): pick another "
                    "--port (SD3_PORT) or --host, or stop what uses it.",
                    style="red",
                )
            )
            raise typer.Exit(2) from None
        err.print(Text(f"Ledger: {_ledger_location(settings)}"))
        if settings.starter_key:
            _print_starter_key(settings)
        runtime = _load_runtime(settings)
        err.print(Text(f"Model: {runtime.description} on {runtime.device}"))
        config.app = create_app(settings, runtime)
        server = uvicorn.Server(config)
        err.print(Text(f"Serving on {url}: the playground at /, the API docs at /docs. Ctrl+C stops it."))
        server.run(sockets=[sock])
    if not server.started:  # uvicorn has logged why (a failed lifespan): as uvicorn.run does
        raise typer.Exit(3)


def _bound_socket(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn, which binds only after the app's lifespan (and so after
    # crash recovery) and exits the process on failure.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not past a live listener
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


STARTER_KEY_NAME = "starter"
STARTER_CREDITS = Decimal(100)


def _ledger_location(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    from server.db.engine import sqlite_path

    path = sqlite_path(settings.resolved_database_url)
    if path is not None:
        return str(path)
    return make_url(settings.resolved_database_url).render_as_string(hide_password=True)


def _print_starter_key(settings: Settings) -> None:
    """On a ledger without keys, make the first one and print it: the only time it is ever shown."""
    ledger = _ledger(settings)
    try:
        if ledger.list_keys():
            err.print(
                Text(
                    "API keys exist in this ledger (the first was printed when it was made); "
                    "`sd3-server keys create --name NAME` makes another."
                )
            )
            return
        _, key = ledger.create_key(name=STARTER_KEY_NAME, credits=STARTER_CREDITS)
    finally:
        ledger.close()
    err.print(Text(f"Your API key, with {STARTER_CREDITS} credits (shown this once; only its hash is kept):"))
    # Alone on standard output, as `keys create` prints a key: KEY=$(...) and log collectors see it plainly.
    out.print(Text(key), soft_wrap=True)


@app.command(cls=GENERATE_FLAGS.command)
@GENERATE_FLAGS
def generate(
    settings: Settings,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt to render")],
    out_path: Annotated[
        Path, typer.Option("--out", "-o", help="Output JPEG (several samples: name-1.jpg, …)")
    ] = Path("image.jpg"),
    negative_prompt: Annotated[
        str | None, typer.Option(help="Prompt to steer away from [default: none; img2img: the page's]")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, max=4)] = 1,
    scheduler: Annotated[
        str, typer.Option(help="e.g. 'DPM++ 2M', 'Euler' (GET /v1/schedulers); img2img: its sampler")
    ] = "DPM++ 2M",
    num_inference_steps: Annotated[
        int | None,
        typer.Option("--steps", "--num-inference-steps", help="10-100 [default: 25; img2img: 1-100, 20]"),
    ] = None,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "--cfg", min=1, max=25)] = 5.0,
    denoise: Annotated[float, typer.Option(min=0.1, max=1)] = 1.0,
    seed: Annotated[int, typer.Option(help="-1 draws a random seed")] = -1,
    img_width: Annotated[int, typer.Option("--width", "--img-width")] = 1024,
    img_height: Annotated[int, typer.Option("--height", "--img-height")] = 1024,
    modelsamplingsd3_shift: Annotated[float, typer.Option("--shift", "--modelsamplingsd3-shift")] = 3.0,
    cond_start: Annotated[float, typer.Option("--conditioningsettimesteprange-start")] = 0.1,
    cond_stop: Annotated[float, typer.Option("--conditioningsettimesteprange-stop")] = 1.0,
    image: Annotated[
        Path | None,
        typer.Option(
            "--image", help="img2img: start from this image (the output has its size, cropped to /8)"
        ),
    ] = None,
    strength: Annotated[float, typer.Option(help="img2img: how much of the image is redrawn, 0-1")] = 0.7,
    schedule: Annotated[
        str | None, typer.Option(help="img2img: the sigma schedule [default: the scheduler name's own]")
    ] = None,
) -> None:
    """Generate one request's images to a file, with no HTTP and no credits.

    With --image, the request is `sd3-med-img2img`'s: --width, --height, --denoise, --shift and the
    timestep range are then not used.
    """
    from server.encoding import to_jpeg

    job: GenerationRequest
    if image is not None:
        job = _img2img_job(
            settings,
            image,
            prompt=prompt,
            negative_prompt=negative_prompt,
            samples=samples,
            sampler=scheduler,
            schedule=schedule,
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            strength=strength,
            seed=seed,
        )
    else:
        job = _txt2img_job(
            prompt=prompt,
            negative_prompt=negative_prompt or "",
            samples=samples,
            scheduler=scheduler,
            num_inference_steps=25 if num_inference_steps is None else num_inference_steps,
            guidance_scale=guidance_scale,
            denoise=denoise,
            seed=seed,
            img_width=img_width,
            img_height=img_height,
            modelsamplingsd3_shift=modelsamplingsd3_shift,
            conditioningsettimesteprange_start=cond_start,
            conditioningsettimesteprange_stop=cond_stop,
        )
    quiet_import_narrators(settings.log_level)
    runtime = _load_runtime(settings)
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]Sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as progress:
        task = progress.add_task("sampling", total=None)

        def on_step(step: int, total: int) -> None:
            progress.update(task, completed=step + 1, total=total)

        result = runtime.generator.generate(job, callback=on_step)
    paths = (
        [out_path]
        if len(result.images) == 1
        else [
            out_path.with_name(f"{out_path.stem}-{i + 1}{out_path.suffix}") for i in range(len(result.images))
        ]
    )
    for path, pixels in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_jpeg(pixels))
    err.print(f"seed {result.seed}, {time.perf_counter() - started:.2f} s on {runtime.device}")
    for path in paths:
        out.print(str(path))


def _txt2img_job(**fields: Any) -> GenerationRequest:
    from pydantic import ValidationError

    from server.schemas import Txt2ImgRequest, describe_validation_errors
    from server.serving import resolve_seed, to_generation_request

    try:
        # The same validation as the HTTP API, so a flag means exactly what the JSON field means.
        body = Txt2ImgRequest(**fields)
    except ValidationError as exc:
        err.print(f"[red]Invalid parameters:[/red] {describe_validation_errors(exc.errors())}")
        raise typer.Exit(2) from None
    return to_generation_request(body, seed=resolve_seed(body.seed))


def _img2img_job(
    settings: Settings,
    image: Path,
    *,
    sampler: str,
    schedule: str | None,
    negative_prompt: str | None,
    steps: int | None,
    **fields: Any,
) -> GenerationRequest:
    """An `sd3-med-img2img` body from the flags, validated and decoded exactly as the API does it."""
    import base64

    from pydantic import ValidationError

    from server.errors import InvalidRequest
    from server.image_input import read_image
    from server.schemas import Img2ImgRequest, describe_validation_errors
    from server.serving import img2img_generation_request, resolve_seed

    try:
        data = image.read_bytes()
    except OSError as exc:
        _fail(f"Cannot read {image}: {exc.strerror or exc}")
        raise typer.Exit(2) from None
    optional = {"negative_prompt": negative_prompt, "num_inference_steps": steps}
    try:
        body = Img2ImgRequest(
            image=base64.b64encode(data).decode(),
            sampler=sampler,
            # A label such as 'DPM++ 2M Karras' names its schedule too; --schedule overrides it.
            scheduler=schedule or _own_schedule(sampler),
            **{name: value for name, value in optional.items() if value is not None},
            **fields,
        )
        decoded = read_image(body.image, settings.limits)
    except ValidationError as exc:
        err.print(f"[red]Invalid parameters:[/red] {describe_validation_errors(exc.errors())}")
        raise typer.Exit(2) from None
    except InvalidRequest as exc:
        err.print(f"[red]Invalid image:[/red] {exc.message}")
        raise typer.Exit(2) from None
    return img2img_generation_request(body, decoded, seed=resolve_seed(body.seed))


def _own_schedule(name: str) -> str:
    from schedulers.names import resolve

    try:
        return resolve(name).schedule
    except ValueError:
        return "sgm_uniform"  # the unknown name is reported by the body's own validation


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A unique name for the key")],
    credits: Annotated[str, typer.Option("--credits", help="Starting balance, in credits (decimal)")] = "0",
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API key; the key alone is printed on the last line of standard output."""
    from server.errors import KeyNameTaken

    settings = build_settings(data_dir=data_dir, database_url=database_url)
    amount = _amount(credits)
    try:
        record, key = _ledger(settings).create_key(name=name, credits=amount)
    except KeyNameTaken:
        _fail(f"A key named {name!r} already exists.")
        raise typer.Exit(1) from None
    except ValueError as exc:
        _fail(str(exc))
        raise typer.Exit(2) from None
    balance = format_credits(record.balance)
    # Where it went: a key made in another data folder than the server's is refused with 401 there.
    err.print(Text(f"Ledger: {_ledger_location(settings)}"))
    err.print(Text(f"Created key {record.name!r} with {balance} credits. It is shown only once:"))
    print(key)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """List keys (names, prefixes, balances; never the keys themselves)."""
    settings = build_settings(data_dir=data_dir, database_url=database_url)
    table = Table("name", "key prefix", "credits", "enabled", "created (UTC)")
    for record in _ledger(settings).list_keys():
        table.add_row(
            Text(record.name),
            record.prefix + "…",
            format_credits(record.balance),
            "yes" if record.enabled else "no",
            record.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)


def _set_enabled(name: str, enabled: bool, data_dir: Path | None, database_url: str | None) -> None:
    from server.errors import UnknownKey

    settings = build_settings(data_dir=data_dir, database_url=database_url)
    try:
        _ledger(settings).set_enabled(name, enabled)
    except UnknownKey:
        _fail(f"No key named {name!r}.")
        raise typer.Exit(1) from None
    err.print(Text(f"Key {name!r} {'enabled' if enabled else 'disabled'}."))


@keys_app.command("disable")
def keys_disable(name: str, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Disable a key: its requests get 401 until it is enabled again."""
    _set_enabled(name, False, data_dir, database_url)


@keys_app.command("enable")
def keys_enable(name: str, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Enable a disabled key."""
    _set_enabled(name, True, data_dir, database_url)


@credits_app.command("add")
def credits_add(
    name: str,
    amount: str,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Add AMOUNT credits to the key NAME; the new balance is printed on standard output."""
    from server.errors import BalanceLimitExceeded, UnknownKey

    settings = build_settings(data_dir=data_dir, database_url=database_url)
    credits = _amount(amount)
    try:
        balance = _ledger(settings).add_credits(name, credits, note="cli")
    except UnknownKey:
        _fail(f"No key named {name!r}.")
        raise typer.Exit(1) from None
    except (BalanceLimitExceeded, ValueError) as exc:
        _fail(str(exc))
        raise typer.Exit(2) from None
    print(format_credits(balance))


@credits_app.command("audit")
def credits_audit(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Check every key: credits granted − charged must equal its balance, and no reservation may be
    stale (its job finished or missing, yet the credits still held). Exit 1 on either."""
    settings = build_settings(data_dir=data_dir, database_url=database_url)
    rows = _ledger(settings).audit()
    table = Table("name", "granted", "charged", "balance", "open reservations", "stale", "ok")
    for row in rows:
        table.add_row(
            Text(row.name),
            format_credits(row.granted),
            format_credits(row.charged),
            format_credits(row.balance),
            str(row.open_reservations),
            str(row.stale_reservations),
            "yes" if row.ok else "[red]NO[/red]",
        )
    out.print(table)
    unbalanced = [row.name for row in rows if not row.balanced]
    stale = [row.name for row in rows if row.stale_reservations]
    if unbalanced:
        _fail(f"Ledger mismatch for: {', '.join(unbalanced)}")
    if stale:
        _fail(
            f"Stale reservations (job finished or missing, credits still held) for: "
            f"{', '.join(stale)}; the instance that made them refunds them when it starts again."
        )
    if unbalanced or stale:
        raise typer.Exit(1)
    err.print(
        f"{len(rows)} key(s) audited: every balance equals its grants minus its charges, "
        "and every open reservation belongs to a queued or running job."
    )


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Upgrade the database to the latest schema (the server also does this when it starts)."""
    settings = build_settings(data_dir=data_dir, database_url=database_url)
    revision = _upgrade(settings)
    err.print(f"Database schema at revision {revision} (the latest).")


@db_app.command("current")
def db_current(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Print the schema revision ("none" before the first upgrade); exit 1 if it is not the latest."""
    from server.db.migrations import schema_status

    settings = build_settings(data_dir=data_dir, database_url=database_url)
    _check_storage(settings, data_dir=False)
    status = schema_status(settings.resolved_database_url)
    print(status.current or "none")
    if not status.up_to_date:
        err.print(f"The latest revision is {status.head}: run `sd3-server db upgrade` (or start the server).")
        raise typer.Exit(1)


def _amount(text: str) -> Decimal:
    try:
        return parse_credits(text)
    except InvalidAmount as exc:
        _fail(f"Invalid amount: {exc}")
        raise typer.Exit(2) from None


def main() -> None:  # pragma: no cover - `python -m server.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
