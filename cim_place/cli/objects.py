"""Local object-store commands: cid, add, cat, export, import, pins, gc.

These work on a store directory on this machine and need no NATS. The store defaults to
``$CIM_PLACE_STORE`` or ``./.cim-place/store`` (beside the state ``cim-place up`` keeps).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cim_place.cli._files import compute_cid, open_input, progress_bar
from cim_place.cli._output import JsonOption, handles_errors, print_json
from cim_place.errors import BlockNotFoundError, CorruptBlockError, StoreError
from cim_place.objectstore import cid as cids
from cim_place.objectstore.unixfs import DEFAULT_PROFILE, get_profile

if TYPE_CHECKING:
    from cim_place.interfaces import Pin
    from cim_place.objectstore.store import ObjectStore

# The store (CAR, DAG-CBOR, multiformats), rich's progress bar and asyncio are imported by the
# commands that use them: `cim-place cid` is called from scripts, once per file, and importing
# them all cost more than hashing a small file (docs/BENCHMARKS.md, bench/cli.py).

DEFAULT_STORE = Path(".cim-place") / "store"

StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Store directory (default: $CIM_PLACE_STORE or ./.cim-place/store).",
        show_default=False,
    ),
]
ProfileOption = Annotated[
    str, typer.Option("--profile", "-p", help="UnixFS profile: unixfs-v1-2025 or unixfs-v0-2015.")
]


def store_path(store: Path | None) -> Path:
    if store is not None:
        return store
    env = os.environ.get("CIM_PLACE_STORE")
    return Path(env) if env else DEFAULT_STORE


def open_store(store: Path | None) -> ObjectStore:
    from cim_place.objectstore.store import ObjectStore

    return ObjectStore(store_path(store))


def open_store_for_reading(store: Path | None) -> ObjectStore:
    """Open an existing store; reading from a store that was never created is a user error."""
    path = store_path(store)
    if not path.exists():
        raise StoreError(
            f"no object store at {path}: add content first (`cim-place add FILE`) "
            "or pass --store DIR / set CIM_PLACE_STORE"
        )
    from cim_place.objectstore.store import ObjectStore

    return ObjectStore(path)


def pin_json(pin: Pin) -> dict[str, object]:
    return {
        "cid": cids.to_str(pin.root),
        "name": pin.name,
        "size": pin.size,
        "blocks": pin.blocks,
        "owner": pin.owner,
        "metadata": dict(pin.metadata),
        "pinned_at": pin.pinned_at,
    }


def parse_metadata(pairs: list[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StoreError(f"metadata {pair!r} is not KEY=VALUE (example: --meta type=invoice)")
        metadata[key] = value
    return metadata


def register(app: typer.Typer) -> None:
    """Add the local object-store commands to the top-level app."""
    app.command("cid")(cid_command)
    app.command("add")(add_command)
    app.command("cat")(cat_command)
    app.command("export")(export_command)
    app.command("import")(import_command)
    app.add_typer(pins_app, name="pins")
    app.command("gc")(gc_command)


@handles_errors
def cid_command(
    file: Annotated[str, typer.Argument(help="File to hash, or - for standard input.")],
    profile: ProfileOption = DEFAULT_PROFILE,
) -> None:
    """Print the root CID FILE would get, storing nothing."""
    typer.echo(compute_cid(file, profile))


def _into_domain(server: str | None, node: str | None, store: Path | None) -> bool:
    """Whether ``add`` goes to a domain: --server or --node, or no --store (nor
    $CIM_PLACE_STORE) inside a directory where `cim-place up` runs a domain."""
    if server is not None or node is not None:
        return True
    if store is not None or os.environ.get("CIM_PLACE_STORE"):
        return False
    from cim_place.cli.context import find_context
    from cim_place.errors import CimPlaceError

    try:
        return find_context() is not None
    except CimPlaceError:
        return False  # a broken context file names no domain


@handles_errors
def add_command(
    file: Annotated[str, typer.Argument(help="File to add, or - for standard input.")],
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Name of the object (in a domain: a domain name too)."),
    ] = None,
    profile: ProfileOption = DEFAULT_PROFILE,
    owner: Annotated[str, typer.Option("--owner", help="Owner recorded on the pin.")] = "",
    meta: Annotated[
        list[str] | None, typer.Option("--meta", "-m", help="Metadata KEY=VALUE (repeatable).")
    ] = None,
    store: StoreOption = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            "-s",
            help="Add to this domain (a hub or leaf NATS URL; default inside a domain "
            "directory: the domain `cim-place up` runs there).",
            show_default=False,
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option("--node", help="The node whose agent stores it (default: chosen by policy)."),
    ] = None,
    creds: Annotated[str | None, typer.Option("--creds", help="NATS credentials file.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Store FILE and print its CID: in the domain (inside a domain directory, or with --server
    or --node; where it went is said on stderr), else in a local store (--store)."""
    get_profile(profile)
    metadata = parse_metadata(meta or [])
    if _into_domain(server, node, store):
        import asyncio

        from cim_place.cli.adding import add_to_domain
        from cim_place.cli.context import server_default

        with open_input(file) as (stream, size):
            added = asyncio.run(
                add_to_domain(
                    server_default(server),  # none given: the domain `cim-place up` runs here
                    creds,
                    node,
                    file,
                    stream,
                    size,
                    name=name,
                    profile=profile,
                    owner=owner,
                    metadata=metadata,
                )
            )
        named = f"; name {name} -> it (revision {added.name_revision})" if name else ""
        typer.echo(f"added to the domain on {added.node} ({added.why}){named}", err=True)
        if json_out:
            print_json(
                {
                    "cid": added.cid,
                    "size": added.size,
                    "blocks": added.blocks,
                    "node": added.node,
                    "name": name,
                }
            )
        else:
            typer.echo(added.cid)
        return
    with (
        open_input(file) as (stream, size),
        open_store(store) as objects,
        progress_bar(size, "adding") as progress,
    ):
        pin = objects.add(
            stream, name=name, profile=profile, owner=owner, metadata=metadata, progress=progress
        )
    if json_out:
        print_json(pin_json(pin))
    else:
        typer.echo(cids.to_str(pin.root))


@handles_errors
def cat_command(
    ref: Annotated[str, typer.Argument(help="CID or pin name.")],
    offset: Annotated[int, typer.Option("--offset", min=0, help="First byte to read.")] = 0,
    length: Annotated[
        int | None, typer.Option("--length", min=0, help="Bytes to read (default: to the end).")
    ] = None,
    store: StoreOption = None,
) -> None:
    """Write a stored file (or a byte range of it) to standard output, verifying every block."""
    out = sys.stdout.buffer
    written = 0
    with open_store_for_reading(store) as objects:
        root = objects.resolve(ref)
        try:
            for chunk in objects.cat(root, offset, length):
                out.write(chunk)
                written += len(chunk)
        except (CorruptBlockError, BlockNotFoundError) as exc:
            out.flush()
            # Every byte written was verified; what is missing is said, never made up.
            problem = "corrupt" if isinstance(exc, CorruptBlockError) else "missing"
            raise StoreError(
                f"cannot cat {ref}: block {exc.cid} is {problem} in {objects.path}; the output "
                f"stops after {written} verified bytes (docs/DURABILITY.md)"
            ) from None
    out.flush()


@handles_errors
def export_command(
    ref: Annotated[str, typer.Argument(help="CID or pin name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CAR file to write.")],
    store: StoreOption = None,
    json_out: JsonOption = False,
) -> None:
    """Export a DAG as a CAR v1 file, readable by the IPFS tools."""
    with open_store_for_reading(store) as objects:
        root = objects.resolve(ref)
        partial = output.with_name(output.name + ".partial")
        try:
            with partial.open("wb") as out:
                written = objects.export_car(root, out)
            partial.replace(output)
        finally:
            partial.unlink(missing_ok=True)
    if json_out:
        print_json({"cid": cids.to_str(root), "car": str(output), "bytes": written})
    else:
        typer.echo(f"{cids.to_str(root)} -> {output} ({written} bytes)")


@handles_errors
def import_command(
    car: Annotated[Path, typer.Argument(help="CAR v1 file to import.")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Pin name for the root.")] = None,
    owner: Annotated[str, typer.Option("--owner", help="Owner recorded on the pins.")] = "",
    store: StoreOption = None,
    json_out: JsonOption = False,
) -> None:
    """Import a CAR file, verifying every block; imports nothing if any block is bad."""
    try:
        handle = car.open("rb")
    except OSError as exc:
        raise StoreError(f"cannot read {car}: {exc.strerror or exc}") from None
    with handle, open_store(store) as objects:
        pins = objects.import_car(handle, name=name, owner=owner)
    if json_out:
        print_json([pin_json(pin) for pin in pins])
    else:
        for pin in pins:
            typer.echo(cids.to_str(pin.root))


pins_app = typer.Typer(help="List and remove pins in the local object store.", no_args_is_help=True)


@pins_app.command("ls")
@handles_errors
def pins_ls(store: StoreOption = None, json_out: JsonOption = False) -> None:
    """List pinned roots."""
    path = store_path(store)
    pins: list[Pin] = []
    if path.exists():
        with open_store(path) as objects:
            pins = objects.pins.list()
    if json_out:
        print_json([pin_json(pin) for pin in pins])
        return
    for pin in pins:
        import time

        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pin.pinned_at))
        typer.echo(f"{cids.to_str(pin.root)}  {pin.size:>12}  {when}  {pin.name or '-'}")


@pins_app.command("rm")
@handles_errors
def pins_rm(
    ref: Annotated[str, typer.Argument(help="CID or pin name.")],
    store: StoreOption = None,
) -> None:
    """Unpin a root. Its blocks stay until `cim-place gc`."""
    with open_store_for_reading(store) as objects:
        pin = objects.unpin(ref)
    typer.echo(f"unpinned {cids.to_str(pin.root)}")


@handles_errors
def gc_command(store: StoreOption = None, json_out: JsonOption = False) -> None:
    """Delete every block that no pinned root references."""
    with open_store_for_reading(store) as objects:
        result = objects.gc()
    if json_out:
        print_json({"blocks_removed": result.blocks_removed, "bytes_freed": result.bytes_freed})
    else:
        typer.echo(f"removed {result.blocks_removed} blocks, freed {result.bytes_freed} bytes")
