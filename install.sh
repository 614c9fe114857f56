#!/usr/bin/env bash
# Installs shmbus: shmbusd and shmbusctl (and shmbus-bridge if this tree
# has it), the systemd units, an example policy, the README and docs, man
# pages and shell completions. Run ./install.sh --help for the options.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./install.sh [OPTIONS]

Builds shmbus in release mode and installs it:

  PREFIX/bin/shmbusd, PREFIX/bin/shmbusctl     (and shmbus-bridge, if built)
  UNITDIR/shmbus.socket, shmbus.service        the system bus (@shmbus)
  UNITDIR/shmbus-bridge.service                with the bridge (its config,
                                               /etc/shmbus/bridge.toml, is yours)
  USERUNITDIR/shmbus.socket, shmbus.service    a user's bus (@shmbus.<uid>)
  /etc/shmbus/policy.toml                      the example policy, if none is there
  PREFIX/share/doc/shmbus/                     README.md and docs/
  PREFIX/share/man/man1/                       shmbusd.1, shmbusctl.1, shmbusctl-*.1
  PREFIX/share/bash-completion/completions/shmbusctl
  PREFIX/share/zsh/site-functions/_shmbusctl
  PREFIX/share/fish/vendor_completions.d/shmbusctl.fish

Every path is under DESTDIR, if set (for packaging). The units' paths
(/usr/local/bin/shmbusd, the README) are rewritten for PREFIX. Nothing is
started or enabled; the script says what to run for that at the end.

Options (each also read from the environment variable in brackets):
  --prefix DIR       install under DIR [PREFIX] (default: /usr/local)
  --destdir DIR      stage everything under DIR [DESTDIR] (default: none)
  --unitdir DIR      system units [UNITDIR] (default: /etc/systemd/system)
  --user-unitdir DIR user units [USERUNITDIR] (default: /etc/systemd/user)
  --no-build         do not run cargo; take the binaries from --bin-dir
  --bin-dir DIR      where the built binaries are (default:
                     $CARGO_TARGET_DIR/release, else target/release)
  --no-units         install no systemd units nor policy
  --dry-run          print what would be done, do nothing
  -h, --help         this text

Examples:
  sudo ./install.sh
  ./install.sh --destdir /tmp/stage --prefix /usr
  ./install.sh --dry-run
EOF
}

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-/etc/systemd/system}
USERUNITDIR=${USERUNITDIR:-/etc/systemd/user}
build=1
units=1
dry=0
bindir=""

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "install.sh: $1 needs a value (see --help)" >&2
        exit 2
    fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --destdir) need_value "$@"; DESTDIR=$2; shift 2 ;;
        --unitdir) need_value "$@"; UNITDIR=$2; shift 2 ;;
        --user-unitdir) need_value "$@"; USERUNITDIR=$2; shift 2 ;;
        --bin-dir) need_value "$@"; bindir=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --no-units) units=0; shift ;;
        --dry-run) dry=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

src=$(cd "$(dirname "$0")" && pwd)
cd "$src"
if [ -z "$bindir" ]; then
    bindir="${CARGO_TARGET_DIR:-$src/target}/release"
fi
case "$PREFIX" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path, not $PREFIX" >&2; exit 2 ;;
esac

# Runs a command, or prints it with --dry-run.
run() {
    if [ "$dry" = 1 ]; then
        printf '%q ' "$@"
        echo
    else
        "$@"
    fi
}

# Writes a command's standard output to a file (or says so with --dry-run).
run_to() {
    local out=$1
    shift
    if [ "$dry" = 1 ]; then
        printf '%q ' "$@"
        echo "> $(printf '%q' "$out")"
    else
        "$@" >"$out"
    fi
}

bridge=0
if [ -f bridge/Cargo.toml ]; then
    bridge=1
fi

if [ "$build" = 1 ]; then
    packages=(-p shmbus-broker)
    if [ "$bridge" = 1 ]; then
        packages+=(-p "$(sed -n 's/^name *= *"\(.*\)"/\1/p' bridge/Cargo.toml | head -n 1)")
    fi
    run cargo build --release --locked "${packages[@]}"
fi

binaries=(shmbusd shmbusctl)
# The bridge when it was built, or (--dry-run, before any build) when the
# build above would have built it.
if [ "$bridge" = 1 ] && { [ -x "$bindir/shmbus-bridge" ] || { [ "$dry" = 1 ] && [ "$build" = 1 ]; }; }; then
    binaries+=(shmbus-bridge)
fi
if [ "$dry" = 0 ]; then
    for b in "${binaries[@]}"; do
        if [ ! -x "$bindir/$b" ]; then
            echo "install.sh: $bindir/$b is missing: build it first (cargo build --release), or drop --no-build" >&2
            exit 1
        fi
    done
fi

root="$DESTDIR$PREFIX"
doc="$root/share/doc/shmbus"
man1="$root/share/man/man1"

echo "== binaries -> $root/bin"
run install -d -m 755 "$root/bin"
for b in "${binaries[@]}"; do
    run install -m 755 "$bindir/$b" "$root/bin/$b"
done

echo "== README and docs -> $doc"
run install -d -m 755 "$doc"
run install -m 644 README.md "$doc/README.md"
for f in docs/*; do
    if [ -f "$f" ]; then
        run install -m 644 "$f" "$doc/$(basename "$f")"
    fi
done

echo "== man pages -> $man1"
run install -d -m 755 "$man1"
run_to "$man1/shmbusd.1" "$bindir/shmbusd" --man
run_to /dev/null "$bindir/shmbusctl" man --out "$man1"

echo "== shell completions"
run install -d -m 755 "$root/share/bash-completion/completions" "$root/share/zsh/site-functions" \
    "$root/share/fish/vendor_completions.d"
run_to "$root/share/bash-completion/completions/shmbusctl" "$bindir/shmbusctl" completions bash
run_to "$root/share/zsh/site-functions/_shmbusctl" "$bindir/shmbusctl" completions zsh
run_to "$root/share/fish/vendor_completions.d/shmbusctl.fish" "$bindir/shmbusctl" completions fish

if [ "$units" = 1 ]; then
    # The units name /usr/local/bin/shmbusd and the README under
    # /usr/local/share/doc: point them at PREFIX.
    unit() {
        local from=$1 to=$2
        run_to "$to" sed "s|/usr/local/|$PREFIX/|g" "$from"
        run chmod 644 "$to"
    }
    echo "== system units -> $DESTDIR$UNITDIR"
    run install -d -m 755 "$DESTDIR$UNITDIR"
    unit systemd/shmbus.socket "$DESTDIR$UNITDIR/shmbus.socket"
    unit systemd/shmbus.service "$DESTDIR$UNITDIR/shmbus.service"
    echo "== user units -> $DESTDIR$USERUNITDIR"
    run install -d -m 755 "$DESTDIR$USERUNITDIR"
    unit systemd/user/shmbus.socket "$DESTDIR$USERUNITDIR/shmbus.socket"
    unit systemd/user/shmbus.service "$DESTDIR$USERUNITDIR/shmbus.service"
    if [[ " ${binaries[*]} " == *" shmbus-bridge "* ]] && [ -f systemd/shmbus-bridge.service ]; then
        unit systemd/shmbus-bridge.service "$DESTDIR$UNITDIR/shmbus-bridge.service"
    fi
    # The system service reads this policy; an edited one is kept.
    if [ -e "$DESTDIR/etc/shmbus/policy.toml" ]; then
        echo "== $DESTDIR/etc/shmbus/policy.toml exists: kept"
    else
        echo "== example policy -> $DESTDIR/etc/shmbus/policy.toml"
        run install -D -m 644 systemd/policy.toml "$DESTDIR/etc/shmbus/policy.toml"
    fi
fi

echo "== done"
if [ "$units" = 1 ] && [ -z "$DESTDIR" ]; then
    cat <<EOF
To start the system bus (@shmbus) on first use:
  systemctl daemon-reload && systemctl enable --now shmbus.socket
  shmbusctl --system status
A user's bus (@shmbus.<uid>), as that user:
  systemctl --user daemon-reload && systemctl --user enable --now shmbus.socket
  shmbusctl status
EOF
fi
