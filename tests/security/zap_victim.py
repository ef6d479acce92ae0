"""The victim of the attack tests, run as a subprocess so its memory can be measured alone.

    python zap_victim.py TOKEN [DRIVER_KWARGS_JSON]

Binds a ZmqDriver(**DRIVER_KWARGS, linger=0) (defaults when left out) gated by `require_token(TOKEN,
accept=TOKEN only)` on 127.0.0.1, prints its address on the first line of stdout, then polls. Each line
"stats" on stdin is answered with one JSON line: rss_kb (VmRSS), hwm_kb (VmHWM, the peak since start or the
last "reset"), refused (refused_handshakes), delivered (messages received), parts (their parts), warnings
(log records of WARNING or above from rallypoint). A line "reset" resets the peak (Linux clear_refs) before
answering the same way. EOF on stdin closes the driver and exits.
"""

from __future__ import annotations

import json
import logging
import select
import sys

from rallypoint.proxy._zmq import ZmqDriver


class Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    token = sys.argv[1].encode()
    kwargs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    counter = Counter()
    logging.getLogger("rallypoint").addHandler(counter)
    logging.getLogger("rallypoint").setLevel(logging.WARNING)
    delivered = parts = 0
    with ZmqDriver(**kwargs, linger=0) as driver:
        driver.require_token(token, lambda credential: credential == token)
        print(driver.bind("127.0.0.1"), flush=True)
        while True:
            for event in driver.poll(0.02):
                if event.kind == "frames" and event.frames is not None:
                    delivered += 1
                    parts += len(event.frames)
            if select.select([sys.stdin], [], [], 0)[0]:
                line = sys.stdin.readline()
                if not line:
                    return
                if line.strip() == "reset":
                    with open("/proc/self/clear_refs", "w") as clear_refs:
                        clear_refs.write("5")  # VmHWM := VmRSS
                stats = dict(rss_kb=status_kb("VmRSS"), hwm_kb=status_kb("VmHWM"),
                             refused=driver.refused_handshakes, delivered=delivered, parts=parts,
                             warnings=counter.count)
                print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
