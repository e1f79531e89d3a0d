"""A site LAN for QEMU boards: an Ethernet hub listening on 127.0.0.1, which every board's
second card connects to (QEMU `-netdev socket,connect=`). A frame from one board goes to
every other board connected at the time, as a hub does.

Invariant: the hub outlives the boards, so a board can be killed and booted again (its
new QEMU connects again) without the others losing their LAN, which a LAN of VMs linked
to one another directly (one listening, the others connecting) cannot give.

QEMU's stream socket framing: each frame is a 4-byte big-endian length, then the frame.

A test can watch the frames (`watch`): the power-cut soak starts its timer when a joining
board opens its first TCP connection (`tcp_open_from`), the join's first exchange.
"""

import socket
import struct
import threading

# A frame larger than any Ethernet frame QEMU sends (jumbo frames included) means the
# stream lost its framing: that board is dropped.
MAX_FRAME = 65536 + 64


class LanHub:
    def __init__(self):
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.address = "127.0.0.1:%d" % self._listener.getsockname()[1]
        # Each board's socket, with the lock its writers take: frames from two boards are
        # never interleaved on a third's stream.
        self._boards = {}
        self._lock = threading.Lock()
        self._closed = False
        self.frames = 0
        # Callables given every frame (by the thread that relays it, outside the lock);
        # one that returns True is done and removed.
        self._watchers = []
        threading.Thread(target=self._accept, name="lan-hub", daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                board, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._boards[board] = threading.Lock()
            threading.Thread(target=self._relay, args=(board,), name="lan-hub-board", daemon=True).start()

    def _relay(self, board):
        try:
            while True:
                head = _read_exactly(board, 4)
                if head is None:
                    return
                (length,) = struct.unpack("!I", head)
                if length > MAX_FRAME:
                    return
                frame = _read_exactly(board, length)
                if frame is None:
                    return
                with self._lock:
                    self.frames += 1
                    others = [(b, lock) for b, lock in self._boards.items() if b is not board]
                    watchers = list(self._watchers)
                for watcher in watchers:
                    if watcher(frame):
                        self.unwatch(watcher)
                for other, lock in others:
                    try:
                        with lock:
                            other.sendall(head + frame)
                    except OSError:
                        self._drop(other)
        except OSError:
            return
        finally:
            self._drop(board)

    def watch(self, watcher):
        """Gives `watcher` every frame from now on, until it returns True."""
        with self._lock:
            self._watchers.append(watcher)

    def unwatch(self, watcher):
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def _drop(self, board):
        with self._lock:
            self._boards.pop(board, None)
        board.close()

    def close(self):
        self._closed = True
        self._listener.close()
        with self._lock:
            boards, self._boards = list(self._boards), {}
        for board in boards:
            board.close()


def mac_bytes(mac):
    return bytes(int(part, 16) for part in mac.split(":"))


def tcp_open_from(frame, mac):
    """Whether `frame` is a TCP SYN (a connection being opened, no ACK) sent by the card
    with MAC address `mac` (bytes), over IPv4 or IPv6 (no extension headers)."""
    if len(frame) < 14 or frame[6:12] != mac:
        return False
    (ethertype,) = struct.unpack("!H", frame[12:14])
    if ethertype == 0x0800 and len(frame) >= 14 + 20:
        if frame[14 + 9] != 6:
            return False
        tcp = 14 + (frame[14] & 0x0F) * 4
    elif ethertype == 0x86DD and len(frame) >= 14 + 40:
        if frame[14 + 6] != 6:
            return False
        tcp = 14 + 40
    else:
        return False
    if len(frame) < tcp + 14:
        return False
    flags = frame[tcp + 13]
    return bool(flags & 0x02) and not flags & 0x10


def _read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
