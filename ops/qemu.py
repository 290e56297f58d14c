"""`deploy install --with-qemu`: QEMU binfmt handlers registered from a host's own packages."""

from __future__ import annotations

from dataclasses import dataclass

from polyarch.agent.detect import BINFMT_DIR, QEMU_HANDLERS, native_platform
from polyarch.ops.inventory import Host
from polyarch.ops.layout import quote
from polyarch.ops.ssh import HostError, RemoteHost
from polyarch.proto.platforms import Platform, PlatformError, parse_platform

# Runs as `sh -c SCRIPT sh HOST MODE BINFMT IMPORTS BINFMT_D SYSTEMD`: every path is an
# argument, so tests run this very script on temporary folders. MODE is "register" or "read".
# The report on stdout is tab-separated: machine, source, boot, warning, status, handler.
_SCRIPT = r"""
host=$1 mode=$2 binfmt=$3 imports=$4 binfmt_d=$5 systemd=$6
fail() { printf '%s\n' "$*" >&2; exit 1; }
warn() { printf 'warning\t%s\n' "$*"; }
write() { out=$( { printf '%s\n' "$2" > "$1"; } 2>&1 ) || warn "writing $1: $out"; }
boot() { printf 'boot\t%s\n' "$1"; }
if [ "$mode" = register ]; then
    [ "$(id -u)" = 0 ] || fail "registering QEMU handlers needs root on $host"
    if [ ! -e "$binfmt/register" ]; then
        out=$(mount -t binfmt_misc binfmt_misc "$binfmt" 2>&1) ||
            fail "$host: binfmt_misc is not mounted on $binfmt and mounting it failed" \
                "(a container without privileges cannot): $out"
        [ -e "$binfmt/register" ] || fail "$host: binfmt_misc on $binfmt has no register file"
    fi
    [ "$(head -n 1 "$binfmt/status" 2>/dev/null)" = disabled ] && write "$binfmt/status" 1
    set -- "$imports"/qemu-*
    if command -v update-binfmts >/dev/null 2>&1 && [ -f "$1" ]; then
        printf 'source\tbinfmt-support\n'
        for path in "$imports"/qemu-*; do
            name=${path##*/}
            if ! out=$(update-binfmts --import "$name" 2>&1); then
                case $out in
                    *"already imported"*) ;;
                    *) warn "update-binfmts --import $name: $out"; continue ;;
                esac
            fi
            # returns 0 with a warning when the handler is enabled already
            out=$(update-binfmts --enable "$name" 2>&1) ||
                warn "update-binfmts --enable $name: $out"
        done
        if [ ! -d "$systemd" ]; then boot "not at boot: no systemd"
        elif out=$(systemctl enable binfmt-support.service 2>&1); then boot "enabled at boot"
        else
            warn "systemctl enable binfmt-support.service: $out"
            boot "not at boot: binfmt-support.service not enabled"
        fi
    elif set -- "$binfmt_d"/qemu-*.conf && [ -f "$1" ]; then
        printf 'source\tbinfmt.d\n'
        for conf in "$binfmt_d"/qemu-*.conf; do
            line=$(grep -v -e '^[#;]' -e '^[[:space:]]*$' "$conf" | head -n 1)
            [ -n "$line" ] || { warn "$conf holds no registration line"; continue; }
            # the first character is the field separator: :NAME:TYPE:...
            name=$(printf '%s\n' "$line" | cut -d "$(printf '%s' "$line" | cut -c 1)" -f 2)
            if [ -e "$binfmt/$name" ]; then write "$binfmt/$name" 1
            else write "$binfmt/register" "$line"; fi
        done
        if [ -d "$systemd" ]; then boot "loaded at boot by systemd-binfmt"
        else boot "not at boot: no systemd"; fi
    else
        fail "no QEMU binfmt handlers among $host's packages: install qemu-user-static" \
            "(Debian/Ubuntu) or qemu-user-static / qemu-user-binfmt (Fedora)"
    fi
fi
printf 'machine\t%s\n' "$(uname -m)"
[ -e "$binfmt/register" ] || { printf 'status\tabsent\n'; exit 0; }
printf 'status\t%s\n' "$(head -n 1 "$binfmt/status" 2>/dev/null)"
for handler in "$binfmt"/qemu-*; do
    [ -f "$handler" ] || continue
    printf 'handler\t%s\t%s\t%s\n' "${handler##*/}" "$(head -n 1 "$handler")" \
        "$(sed -n 's/^flags: *//p' "$handler")"
done
"""


@dataclass(frozen=True)
class BinfmtPaths:
    """Where the kernel's binfmt_misc and the packages' handler files are (tests move them)."""

    binfmt: str = str(BINFMT_DIR)
    imports: str = "/usr/share/binfmts"  # binfmt-support's format files
    binfmt_d: str = "/usr/lib/binfmt.d"  # systemd's
    systemd: str = "/run/systemd/system"


def script_command(host_name: str, mode: str, paths: BinfmtPaths = BinfmtPaths()) -> str:
    """The shell command that registers (mode "register") or only reads ("read") handlers."""
    args = (host_name, mode, paths.binfmt, paths.imports, paths.binfmt_d, paths.systemd)
    return f"sh -c {quote(_SCRIPT)} sh {quote(*args)}"


@dataclass(frozen=True)
class Handler:
    name: str
    enabled: bool
    flags: str  # binfmt_misc's letters: F = interpreter fixed at registration


@dataclass(frozen=True)
class QemuReport:
    """The qemu-* handlers a host's kernel has, and where registration took them from."""

    machine: str
    status: str  # binfmt_misc as a whole: enabled, disabled or absent (not mounted)
    handlers: tuple[Handler, ...] = ()
    source: str = ""  # binfmt-support or binfmt.d; "" when only read
    boot: str = ""  # whether they come back after a reboot
    notes: tuple[str, ...] = ()  # the script's warnings

    def enabled(self) -> list[Handler]:
        return [h for h in self.handlers if h.enabled and self.status == "enabled"]

    def by_handler(self) -> dict[str, list[str]]:
        """Known enabled handler -> the platforms it adds (never the native one)."""
        try:
            native: Platform | None = native_platform(self.machine)
        except PlatformError:
            native = None
        found: dict[str, list[str]] = {}
        for handler in self.enabled():
            added = [p for p in QEMU_HANDLERS.get(handler.name, ()) if parse_platform(p) != native]
            if added:
                found[handler.name] = added
        return found

    @property
    def platforms(self) -> list[str]:
        return sorted({p for added in self.by_handler().values() for p in added})

    @property
    def warnings(self) -> list[str]:
        unfixed = [h.name for h in self.enabled() if "F" not in h.flags]
        if not unfixed:
            return list(self.notes)
        return [*self.notes, "handlers without the F flag (builds inside containers or chroots "
                "need the interpreter fixed at registration): " + ", ".join(unfixed)]  # fmt: skip


def parse_report(host_name: str, text: str) -> QemuReport:
    """The script's tab-separated report; HostError naming the host when it is not one."""
    fields: dict[str, str] = {}
    handlers: list[Handler] = []
    notes: list[str] = []
    for line in text.splitlines():
        kind, _, rest = line.partition("\t")
        if kind == "handler":
            name, state, flags = [*rest.split("\t"), "", ""][:3]
            handlers.append(Handler(name, state == "enabled", flags.strip()))
        elif kind == "warning":
            notes.append(rest)
        elif kind in ("machine", "status", "source", "boot"):
            fields[kind] = rest.strip()
    if "machine" not in fields or "status" not in fields:
        raise HostError(f"{host_name}: unexpected report of QEMU handlers: {text.strip()!r}")
    return QemuReport(
        machine=fields["machine"], status=fields["status"] or "enabled",
        handlers=tuple(handlers), source=fields.get("source", ""),
        boot=fields.get("boot", ""), notes=tuple(notes),
    )  # fmt: skip


def check_coverage(host: Host, report: QemuReport) -> None:
    """The inventory's `emulated` platforms must each have an enabled handler (or be native)."""
    try:
        native = str(native_platform(report.machine))
    except PlatformError:
        native = ""
    covered = {str(parse_platform(p)) for p in report.platforms} | {native}
    missing = [p for p in host.emulated if str(parse_platform(p)) not in covered]
    if missing:
        raise HostError(
            f"{host.name}: emulated {' '.join(missing)} not covered by an enabled QEMU "
            f"handler; registered: {describe_handlers(report)}"
        )


async def register_qemu(remote: RemoteHost) -> QemuReport:
    """Registers the host's packaged QEMU handlers and checks the inventory's `emulated`."""
    host = remote.host
    done = await remote.run(script_command(host.name, "register"), step="registering QEMU handlers")
    report = parse_report(host.name, done.stdout)
    if not report.enabled():
        why = "; ".join(report.notes) or f"binfmt_misc is {report.status}"
        raise HostError(f"{host.name}: no QEMU handler enabled from {report.source}: {why}")
    check_coverage(host, report)
    return report


async def qemu_handlers(remote: RemoteHost) -> QemuReport:
    """The host's QEMU handlers as they are (nothing registered, nothing mounted)."""
    done = await remote.run(script_command(remote.host.name, "read"), step="reading QEMU handlers")
    return parse_report(remote.host.name, done.stdout)


def registers_qemu(host: Host, flag: bool) -> bool:
    """The host's own `with_qemu` when the inventory sets it, else the --with-qemu flag."""
    return host.with_qemu if host.with_qemu is not None else flag


def describe_handlers(report: QemuReport) -> str:
    """`linux/arm64 (qemu-aarch64), ...; N other handlers`: unknown handlers only counted."""
    known = report.by_handler()
    spelled = [f"{' '.join(platforms)} ({name})" for name, platforms in known.items()]
    others = len(report.enabled()) - len(known)
    return f"{', '.join(spelled) or 'none'}; {others} other handlers"


def summary_lines(host_name: str, report: QemuReport) -> list[str]:
    """What install prints after its table for a host that registered QEMU handlers."""
    head = f"{host_name}: QEMU handlers from {report.source} ({report.boot})"
    return [f"{head}: {describe_handlers(report)}"] + [
        f"{host_name}: warning: {warning}" for warning in report.warnings
    ]
