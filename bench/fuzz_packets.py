"""Fuzzes the packet decoder with crafted packets whose CRC-32C is recomputed.

    python bench/fuzz_packets.py                   # 100,000 packets, seed 0
    python bench/fuzz_packets.py --packets 20000 --seed 7

Each case starts from a valid packet of a random codec and tensor (at most 4096
elements), edits it -- one to three header fields set to a boundary value
(0, 2^31, 2^32 - 1, 2^63, 2^64 - 1, ...) or a random one, payload bytes
overwritten, the packet truncated or extended, or the whole header replaced by
random fields -- optionally makes the payload-length field agree with the new
length, recomputes the CRC so the edit passes the checksum, and decodes it
three times: with ``expect_shape`` = the original shape, with ``max_numel`` = the
original element count, and with neither (the default budget of 2^26 elements),
in worker processes whose address space is capped at 2 GiB (``--address-space``):
a decode that asked for more than that would die with MemoryError.

Reports crashes (a worker process killed by a signal), exceptions other than
``ValueError``, how many edited packets still decoded, and the largest number
of bytes one decode allocated beyond the caller's expected size (4 bytes per
expected element), as a multiple of the packet's length. Allocations are the
extension's own buffers (``_C.peak_buffer_bytes``: packets, decoded tensors and
every decode temporary); a float16/bfloat16 source adds torch's cast of the
result, at most 2 bytes per expected element.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import subprocess
import sys
import time

import torch

from pysim import _C
from pysim.compress import DEFAULT_MAX_NUMEL, get_codec, packet_header, unpack

SPECS = ["dense", "dense:fp16", "dense:bf16", "topk:0.05", "topk:1", "topk:0.2:raw", "topk:0.1:int2",
         "randomk:0.1", "randomk:1.0", "lowrank:1", "lowrank:3:fp16", "int8", "int8:4:stochastic", "int4",
         "int4:2:stochastic", "int8:256"]
BOUNDARY = [0, 1, 2, 3, 7, 8, 31, 32, 63, 64, 255, 256, 2**16 - 1, 2**16, 2**24, 2**30, 2**31 - 1, 2**31,
            2**32 - 1, 2**32, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
FIELDS = ["version", "codec", "value_dtype", "source_dtype", "ndim", "flags", "reserved", "payload_len", "dim",
          "param", "payload_byte", "truncate", "extend", "random_header"]
BYTE_AT = {"version": 4, "codec": 5, "value_dtype": 6, "source_dtype": 7, "ndim": 8, "flags": 9, "reserved": 10}


def reseal(b: bytearray) -> bytes:
    """The packet with its CRC-32C (bytes 12..16, computed with them as zero) recomputed."""
    b[12:16] = bytes(4)
    b[12:16] = struct.pack("<I", _C.crc32c(bytes(b)))
    return bytes(b)


def value(rng: random.Random, bits: int) -> int:
    v = rng.choice(BOUNDARY) if rng.random() < 0.6 else rng.getrandbits(bits)
    return v & ((1 << bits) - 1)


def edit(rng: random.Random, b: bytearray, header_bytes: int) -> None:
    """Applies one random edit to packet b in place."""
    field = rng.choice(FIELDS if len(b) >= 24 else ["truncate", "extend", "random_header"])
    ndim = min(b[8], 8) if len(b) >= 24 else 0
    header_bytes = min(header_bytes, len(b))
    if field in BYTE_AT:
        b[BYTE_AT[field]] = value(rng, 8)
    elif field == "payload_len":
        b[16:24] = struct.pack("<Q", value(rng, 64))
    elif field == "dim" and ndim:
        o = 24 + 4 * rng.randrange(ndim)
        b[o:o + 4] = struct.pack("<I", value(rng, 32))
    elif field == "param" and header_bytes > 24 + 4 * ndim + 4:
        o = rng.randrange(24 + 4 * ndim, header_bytes - 3)
        if rng.random() < 0.5 and o + 8 <= header_bytes:
            b[o:o + 8] = struct.pack("<Q", value(rng, 64))
        else:
            b[o:o + 4] = struct.pack("<I", value(rng, 32))
    elif field == "payload_byte" and len(b) > header_bytes:
        b[rng.randrange(header_bytes, len(b))] = rng.getrandbits(8)
    elif field == "truncate":
        del b[rng.randrange(max(1, len(b))):]
    elif field == "extend":
        b += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 65)))
    elif field == "random_header":
        nd = rng.randrange(0, 9)
        head = struct.pack("<4sBBBBBBHIQ", b"PSIM", 2, rng.randrange(8), rng.randrange(4), rng.randrange(4), nd,
                           rng.randrange(4), 0, 0, value(rng, 64))
        head += b"".join(struct.pack("<I", value(rng, 32)) for _ in range(nd))
        head += b"".join(struct.pack("<Q", value(rng, 64)) for _ in range(rng.randrange(3)))
        b[:] = head + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))


def decode(packet: bytes, expected_numel: int, **limits) -> tuple[str, int]:
    """('ok' | 'ValueError' | other exception name, bytes allocated beyond 4 * expected_numel)."""
    _C.peak_buffer_bytes(True)
    held = _C.peak_buffer_bytes(True)  # right after a reset the peak is what is held now
    try:
        out = unpack(packet, **limits)
        result = "ok"
        del out
    except ValueError:
        result = "ValueError"
    except Exception as e:  # noqa: BLE001 - counting exactly these is the point
        result = type(e).__name__
    extra = _C.peak_buffer_bytes(True) - held - 4 * expected_numel
    return result, max(0, extra)


def worker(start: int, count: int, seed: int) -> dict:
    stats = {"cases": 0, "decodes": 0, "accepted": 0, "other_exceptions": {}, "max_ratio": 0.0, "worst": None,
             "max_unbounded_bytes": 0}
    for i in range(start, start + count):
        rng = random.Random(seed * 1_000_003 + i)
        spec = rng.choice(SPECS)
        shape = [rng.randrange(1, 17) for _ in range(rng.randrange(1, 4))]
        x = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        original = get_codec(spec).pack(x, key="f", step=i).numpy().tobytes()
        b = bytearray(original)
        header_bytes = packet_header(original)["header_bytes"]
        for _ in range(rng.choice([1, 1, 2, 3])):
            edit(rng, b, header_bytes)
        if rng.random() < 0.5 and len(b) >= 24 and b[5] < 6 and b[8] <= 8:
            params = {0: 0, 1: 8, 2: 16, 3: 8, 4: 12, 5: 12}[b[5]]
            b[16:24] = struct.pack("<Q", max(0, len(b) - 24 - 4 * b[8] - params))
        packet = reseal(b) if len(b) >= 16 else bytes(b)
        numel = math.prod(shape)
        stats["cases"] += 1
        for limits in ({"expect_shape": tuple(shape)}, {"max_numel": numel}, {}):
            result, extra = decode(packet, numel, **limits)
            stats["decodes"] += 1
            if result == "ok":
                stats["accepted"] += 1
            elif result != "ValueError":
                stats["other_exceptions"][result] = stats["other_exceptions"].get(result, 0) + 1
            if not limits:  # bounded by the default budget, not by the caller's size
                stats["max_unbounded_bytes"] = max(stats["max_unbounded_bytes"], extra + 4 * numel)
                continue
            ratio = extra / max(1, len(packet))
            if ratio > stats["max_ratio"]:
                stats["max_ratio"], stats["worst"] = ratio, {"case": i, "spec": spec, "limits": str(limits),
                                                             "bytes": extra, "packet_len": len(packet)}
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=25_000, help="cases per worker process")
    ap.add_argument("--address-space", type=float, default=2.0, help="GiB a worker process may map (0: no cap)")
    ap.add_argument("--worker", nargs=2, type=int, metavar=("START", "COUNT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.address_space > 0:
            import resource

            cap = int(args.address_space * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(worker(args.worker[0], args.worker[1], args.seed)))
        return
    t0 = time.perf_counter()
    total = {"cases": 0, "decodes": 0, "accepted": 0, "other_exceptions": {}, "max_ratio": 0.0, "worst": None,
             "max_unbounded_bytes": 0}
    crashes = []
    for start in range(0, args.packets, args.batch):
        count = min(args.batch, args.packets - start)
        proc = subprocess.run([sys.executable, __file__, "--seed", str(args.seed), "--address-space",
                               str(args.address_space), "--worker", str(start), str(count)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            crashes.append({"cases": [start, start + count], "returncode": proc.returncode,
                            "stderr": proc.stderr[-500:]})
            continue
        s = json.loads(proc.stdout.strip().splitlines()[-1])
        for key in ("cases", "decodes", "accepted"):
            total[key] += s[key]
        for name, n in s["other_exceptions"].items():
            total["other_exceptions"][name] = total["other_exceptions"].get(name, 0) + n
        total["max_unbounded_bytes"] = max(total["max_unbounded_bytes"], s["max_unbounded_bytes"])
        if s["max_ratio"] >= total["max_ratio"]:
            total["max_ratio"], total["worst"] = s["max_ratio"], s["worst"]
    cap = f"{args.address_space:g} GiB address space" if args.address_space > 0 else "no address-space cap"
    print(f"packets: {total['cases']} crafted (seed {args.seed}), {total['decodes']} decodes (with a shape, with "
          f"max_numel, with neither), {cap}, {time.perf_counter() - t0:.1f} s")
    print(f"crashes (worker killed or failed): {len(crashes)}{'' if not crashes else ' ' + json.dumps(crashes)}")
    print(f"exceptions other than ValueError: {sum(total['other_exceptions'].values())} "
          f"{total['other_exceptions'] or ''}".rstrip())
    print(f"decodes accepted (edit left a valid packet within the caller's limits): {total['accepted']}")
    print(f"max allocation beyond the caller's expected size (with a shape or max_numel): "
          f"{total['max_ratio']:.2f}x the packet length "
          f"(target <= 64x); worst case {json.dumps(total['worst'])}")
    budget = 4 * DEFAULT_MAX_NUMEL
    print(f"largest decode without a shape or max_numel: {total['max_unbounded_bytes'] / 2**20:.1f} MiB "
          f"(default budget {budget / 2**20:.0f} MiB)")
    if crashes or total["other_exceptions"] or total["max_ratio"] > 64 or total["max_unbounded_bytes"] > budget:
        sys.exit(1)


if __name__ == "__main__":
    main()
