"""Run a program where every host-name lookup is seen and none can leave the machine.

    unshare --user --map-root-user --mount --net python dns_sandbox.py SECONDS -- PROGRAM ARGS...

Inside the new namespaces (made by ``unshare`` for this run only): the loopback interface is brought
up, /etc/resolv.conf is replaced (bind mount) by one naming 127.0.0.1, and a fake DNS server there
answers every query NXDOMAIN and records the name. A probe lookup proves the recording works; then
PROGRAM runs (its environment as given) for SECONDS at most. Prints one JSON line:
``{"probe_seen": bool, "names": [...], "returncode": int, "output": "..."}``.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

PROBE = "sd3trt-dns-sandbox-probe.test"


def qname(packet: bytes) -> str:
    labels, i = [], 12
    while i < len(packet) and packet[i] and len(labels) < 64:
        n = packet[i]
        labels.append(packet[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels)


def fake_dns(sock: socket.socket, names: list[str], stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            packet, addr = sock.recvfrom(2048)
        except socket.timeout:
            continue
        if len(packet) < 12:
            continue
        names.append(qname(packet))
        end = packet.index(b"\0", 12) + 5  # the question: name, type, class
        flags = struct.pack(">H", 0x8183)  # response, recursion desired/available, NXDOMAIN
        sock.sendto(packet[:2] + flags + b"\0\x01\0\0\0\0\0\0" + packet[12:end], addr)


def main() -> None:
    seconds = float(sys.argv[1])
    program = sys.argv[sys.argv.index("--") + 1:]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    conf = tempfile.NamedTemporaryFile("w", suffix=".resolv.conf", delete=False)
    conf.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    conf.close()
    subprocess.run(["mount", "--bind", conf.name, "/etc/resolv.conf"], check=True)
    names: list[str] = []
    stop = threading.Event()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    threading.Thread(target=fake_dns, args=(sock, names, stop), daemon=True).start()
    try:
        socket.getaddrinfo(PROBE, 80)
    except socket.gaierror:
        pass
    probe_seen = PROBE in names
    names.clear()
    try:
        out = subprocess.run(program, capture_output=True, text=True, timeout=seconds)
        code, output = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        code, output = -1, f"timed out after {seconds} s: {e.stdout!r} {e.stderr!r}"
    time.sleep(0.3)
    stop.set()
    print(json.dumps({"probe_seen": probe_seen, "names": sorted(set(names)), "returncode": code,
                      "output": output[-3000:]}))


if __name__ == "__main__":
    main()
