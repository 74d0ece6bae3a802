"""``orch image`` and ``orch publish``: a Raspberry Pi image that joins the cluster on first
boot, and the wheels it installs from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchcore.errors import InvalidSettingError, OrchError
from orchestrator.cli.app import app, console, err, fail, setup_logging

_IMAGE_EPILOG = (
    "Steps: (1) in another terminal, `orch publish` serves orch's wheel (and --wheels DIR, "
    "e.g. an arm64 llama-cpp-python wheel) on the LAN; keep it running until the Pis have "
    "booted. (2) `orch image raspios-trixie-arm64-lite.img.xz -o node.img --token-file "
    "token.txt` (token.txt: the cluster token, mode 600). (3) Flash node.img to every card "
    "and boot the Pis. Each names itself orch-xxxxxx, installs orch and starts its worker; "
    "`orch cluster` lists them. Guide: docs/raspberry-pi.md.")


@app.command(epilog=_IMAGE_EPILOG)
def image(
    token_file: Annotated[Path, typer.Option(
        help="File holding the cluster token, one line (mode 600: refused if others may "
             "read it).", show_default=False)],
    source: Annotated[Path | None, typer.Argument(
        help="The official image: Raspberry Pi OS Lite (64-bit, Trixie or later) or Ubuntu "
             "Server for Raspberry Pi, .img.xz or .img (it is not changed).", show_default=False)
    ] = None,
    out: Annotated[Path | None, typer.Option(
        "-o", "--out", help="The node image to write (flash it to every card).")] = None,
    boot_dir: Annotated[Path | None, typer.Option(
        help="Instead of an image: the mounted boot partition of a card already flashed "
             "with the official image (bootfs, system-boot).")] = None,
    wifi_ssid: Annotated[str | None, typer.Option(
        help="Wi-Fi network to join (wired Ethernet always works).")] = None,
    wifi_password_file: Annotated[Path | None, typer.Option(
        help="File holding the Wi-Fi password (mode 600); removed from the card at first "
             "boot.")] = None,
    wifi_country: Annotated[str | None, typer.Option(
        help="Two-letter country of the Wi-Fi (GB, US, DE...): the Pi keeps Wi-Fi off "
             "without it.")] = None,
    ssh_key: Annotated[Path | None, typer.Option(
        help="Public key file (~/.ssh/id_ed25519.pub) to log in as user orch; enables SSH.")
    ] = None,
    wheels_url: Annotated[str | None, typer.Option(
        help="Where `orch publish` serves the wheels; default: http://THIS-MACHINE'S-LAN-"
             "ADDRESS:8765/. Their sha256 are pinned in the image.")] = None,
    hostname_prefix: Annotated[str, typer.Option(
        help="Nodes name themselves PREFIX-xxxxxx (random) at first boot.")] = "orch",
    network_renderer: Annotated[str, typer.Option(
        help="Netplan renderer: NetworkManager (Raspberry Pi OS) or networkd (Ubuntu).")
    ] = "NetworkManager",
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")
    ] = False,
) -> None:
    """Make a Raspberry Pi image that becomes an orch worker at its first boot.

    Copies SOURCE to --out (decompressing .xz) and writes cloud-init's user-data,
    network-config and meta-data, and the cluster token, into its FAT boot partition:
    no root, no mounting (mtools). Or writes them into --boot-dir. One image serves any
    number of Pis: each makes its own name and worker id. Secrets come from files only.
    """
    setup_logging(False)
    from importlib.resources import files

    from orchestrator.pi import cloudinit, publish
    from orchestrator.pi.image import (
        prepare_image,
        read_secret,
        read_ssh_keys,
        write_into_folder,
    )

    try:
        if (source is None) == (boot_dir is None) or (source is not None and out is None):
            raise InvalidSettingError("give the official image and -o NODE.img, or --boot-dir "
                                      "DIR of a flashed card (orch image --help)")
        if (wifi_ssid is None) != (wifi_password_file is None) or \
                (wifi_ssid is not None and wifi_country is None):
            raise InvalidSettingError("Wi-Fi needs --wifi-ssid, --wifi-password-file and "
                                      "--wifi-country together")
        token = cloudinit.check_token(read_secret(token_file, "cluster token"), str(token_file))
        wifi = None if wifi_ssid is None or wifi_password_file is None else cloudinit.Wifi(
            wifi_ssid, read_secret(wifi_password_file, "Wi-Fi password"), wifi_country or "")
        url = publish.wheels_url(wheels_url)
        seed = cloudinit.NodeSeed(
            wheels_url=url, wheels=publish.fetch_manifest(url),
            llama_requirement=publish.llama_requirement(),
            firstboot_source=files("worker").joinpath("firstboot.py").read_text(),
            ssh_keys=read_ssh_keys(ssh_key) if ssh_key is not None else (), wifi=wifi,
            hostname_prefix=hostname_prefix, renderer=network_renderer)
        written = cloudinit.boot_files(seed, token)
        if boot_dir is not None:
            write_into_folder(boot_dir, written)
            where: dict[str, object] = {"boot_dir": str(boot_dir)}
        else:
            assert source is not None and out is not None  # checked above
            part = prepare_image(source, out, written, progress=not as_json)
            where = {"image": str(out), "boot_partition": {
                "number": part.number, "offset": part.offset, "size": part.size}}
    except OrchError as exc:
        fail(exc)
    report = {**where, "files": sorted(written), "token_note": cloudinit.TOKEN_NOTE,
              "wheels_url": url,
              "wheels": [w.name for w in seed.wheels],
              "builds_llama_cpp_on_the_pi": not seed.has_llama_wheel}
    if as_json:
        console.print_json(data=report)
        return
    console.print(f"wrote {', '.join(sorted(written))} into "
                  f"{where.get('image') or where['boot_dir']}"
                  + (" (mode 0600: it holds the cluster token)" if "image" in where else ""),
                  highlight=False, soft_wrap=True)
    console.print(f"note: {cloudinit.TOKEN_NOTE}", highlight=False, soft_wrap=True)
    console.print(f"at first boot each Pi installs {', '.join(report['wheels'])} from {url} "
                  f"(sha256 pinned)" + ("; no arm64 llama-cpp-python wheel is published, so "
                                        "each Pi builds it (about an hour, an estimate)"
                                        if report["builds_llama_cpp_on_the_pi"] else ""),
                  highlight=False)
    console.print("keep `orch publish` running until the Pis are up; follow one with: ssh "
                  "orch@NODE journalctl -u orch-firstboot -f; then: orch cluster",
                  highlight=False)


@app.command()
def publish(
    wheels: Annotated[list[Path] | None, typer.Option(
        help="Extra wheels to publish, a .whl or a folder of them (repeatable), e.g. the "
             "arm64 llama-cpp-python wheel the arm64 build makes.")] = None,
    orch_wheel: Annotated[Path | None, typer.Option(
        help="orch's own wheel; default: built from this checkout.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8765,
    folder: Annotated[Path | None, typer.Option(
        help="Where the published wheels are kept; default: the orch cache's publish/.")
    ] = None,
) -> None:
    """Serve over HTTP the wheels new Raspberry Pis install orch from (orch image pins their
    sha256): orch's own wheel, built from this checkout, and the --wheels given. A Pi uses
    a published wheel that fits it and builds the others from PyPI. Runs until Ctrl+C."""
    setup_logging(False)
    from orchcore.paths import cache_dir
    from orchestrator.pi import publish as published

    target = folder or cache_dir() / "publish"
    try:
        with err.status("building orch's wheel"):
            pinned = published.gather(target, orch_wheel, wheels or ())
        server = published.make_server(target, host, port)
    except OrchError as exc:
        fail(exc)
    lan = published.lan_address()
    shown = (lan or "127.0.0.1") if host in ("0.0.0.0", "", "::") else host
    bound = server.server_address[1]
    url = f"http://{shown}:{bound}/"
    table = Table(title=f"published from {target}")
    for col in ("wheel", "MiB", "sha256"):
        table.add_column(col)
    for wheel in pinned:
        table.add_row(wheel.name, f"{wheel.size / (1 << 20):.1f}", wheel.sha256[:16])
    err.print(table)
    console.print(url, highlight=False)
    err.print(_next_step(url, host, port, lan), highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err.print("stopped")
    finally:
        server.server_close()


def _next_step(url: str, host: str, port: int, lan: str | None) -> str:
    """What to run next, never a URL a Pi cannot use without saying so."""
    from urllib.parse import urlsplit

    from orchcore.clustertoken import is_loopback
    from orchestrator.pi.publish import DEFAULT_PORT

    if is_loopback(urlsplit(url).hostname or ""):
        where = f" (this machine's LAN address is {lan})" if lan else \
            " (this machine has no LAN address yet)"
        return (f"warning: {url} is loopback: a Pi cannot fetch from it, and orch image "
                f"refuses it; for the Pis, run orch publish --host 0.0.0.0{where}; serving "
                f"until Ctrl+C")
    default = port == DEFAULT_PORT and host in ("0.0.0.0", "", "::")
    return (f"next: orch image IMAGE.img.xz -o node.img --token-file token.txt"
            f"{'' if default else ' --wheels-url ' + url}; serving until Ctrl+C")
