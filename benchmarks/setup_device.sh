# shellcheck shell=bash
# Prepare a bare GPU machine (the device tool's nvidia-* kinds) for benchmarks.
#
#   source benchmarks/setup_device.sh        # from the repo root, with .whl carried
#
# What it does, and why:
#  * Installs the carried wheels (.whl/*.whl: deepspeed built here with
#    DS_BUILD_OPS=0, plus hjson / pydantic & co. that the image lacks) into
#    /tmp/site.  The machine has no network, so --no-index; --no-deps because
#    every dependency is either carried or already in the image.
#  * Unpacks the carried libaio .debs (.whl/debs/, deliberately NOT matched by
#    the .whl/*.whl glob) into /tmp/aio -- never into / , which could break the
#    image -- and points the compiler, linker and loader at them, so
#    DeepSpeed's async_io op can JIT-build for the NVMe peer runs.
#  * Exports TORCH_CUDA_ARCH_LIST=9.0: the image's "9.0a" crashes DeepSpeed's
#    op builder (int('0a')).
#  * Keeps NVLink multicast off (NCCL / PyTorch symmetric memory / NVSHMEM): the
#    workplace requires it on multi-GPU hosts, and we set it on every kind so
#    no launcher forgets it.
#  * Puts the repo root on PYTHONPATH so `import tierlift` uses this checkout
#    (no network there, and an editable install buys nothing for a benchmark).
#
# Must be sourced (it exports into the caller's shell).  Idempotent: a second
# source re-installs nothing unless the carried wheels changed, and does not
# grow the PATH-like variables.  It deliberately avoids `set -e`/`exit`, which
# would kill the caller's shell; it returns non-zero on failure instead.

if ! (return 0 2>/dev/null); then
    echo "setup_device.sh: source it: 'source benchmarks/setup_device.sh'" >&2
    exit 2
fi

_tl_setup() {
    local repo whl site aio py stamp want f
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    whl="$repo/.whl"
    site="${TL_SITE:-/tmp/site}"   # overridable only for testing the script off-device
    aio="${TL_AIO:-/tmp/aio}"
    py="$(command -v python3)"

    # Prepend $2 to the colon-separated variable named $1 unless already there.
    _tl_prepend() {
        local name="$1" dir="$2" cur
        cur="${!name:-}"
        case ":$cur:" in
            *":$dir:"*) ;;
            *) if [ -n "$cur" ]; then export "$name=$dir:$cur"; else export "$name=$dir"; fi ;;
        esac
    }

    # --- wheels -----------------------------------------------------------
    if compgen -G "$whl/*.whl" >/dev/null; then
        # The stamp is the list of wheel names and sizes: re-install only when
        # the carried set changed (a fresh machine has no stamp at all).
        want="$(cd "$whl" && ls -l -- *.whl | awk '{print $5, $NF}' | sort | md5sum | cut -d' ' -f1)"
        stamp="$site/.tierlift-wheels-$want"
        if [ ! -e "$stamp" ]; then
            echo "[setup_device] installing $(ls "$whl"/*.whl | wc -l) wheels into $site"
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$site" "$whl"/*.whl || { echo "[setup_device] pip install failed" >&2; return 1; }
            rm -f "$site"/.tierlift-wheels-* && touch "$stamp"
        else
            echo "[setup_device] wheels already installed in $site"
        fi
    else
        echo "[setup_device] WARNING: no wheels under $whl (name .whl in the run's carry); deepspeed runs will fail" >&2
    fi

    # --- libaio (for DeepSpeed's async_io op) ------------------------------
    if compgen -G "$whl/debs/*.deb" >/dev/null; then
        if [ ! -e "$aio/usr/include/libaio.h" ]; then
            mkdir -p "$aio"
            for f in "$whl"/debs/*.deb; do
                dpkg -x "$f" "$aio" || { echo "[setup_device] dpkg -x $f failed" >&2; return 1; }
            done
            echo "[setup_device] unpacked libaio into $aio"
        fi
        _tl_prepend CPATH "$aio/usr/include"
        _tl_prepend LIBRARY_PATH "$aio/usr/lib/x86_64-linux-gnu"
        _tl_prepend LD_LIBRARY_PATH "$aio/usr/lib/x86_64-linux-gnu"
        # DeepSpeed's libaio probe (OpBuilder.has_function) also reads CFLAGS/LDFLAGS.
        case " ${CFLAGS:-} " in *" -I$aio/usr/include "*) ;; *) export CFLAGS="${CFLAGS:+$CFLAGS }-I$aio/usr/include" ;; esac
        case " ${LDFLAGS:-} " in *" -L$aio/usr/lib/x86_64-linux-gnu "*) ;; *) export LDFLAGS="${LDFLAGS:+$LDFLAGS }-L$aio/usr/lib/x86_64-linux-gnu" ;; esac
    fi

    # --- Python path: this checkout's tierlift first, then the carried wheels
    _tl_prepend PYTHONPATH "$site"
    _tl_prepend PYTHONPATH "$repo"

    # --- build / runtime environment --------------------------------------
    export TORCH_CUDA_ARCH_LIST=9.0
    export DS_ACCELERATOR=cuda            # the wheel was built on a CPU box; don't let DS guess
    export NCCL_NVLS_ENABLE=0
    export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    export NVSHMEM_DISABLE_NVLS=1
    export PYTHONUNBUFFERED=1
    echo "[setup_device] ok: PYTHONPATH=$PYTHONPATH TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
    unset -f _tl_prepend
    return 0
}

_tl_setup
_tl_rc=$?
unset -f _tl_setup
return $_tl_rc
