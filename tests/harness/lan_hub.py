"""A site LAN for QEMU boards: an Ethernet hub listening on 127.0.0.1, which every board's
second card connects to (QEMU `-netdev socket,connect=`). A frame from one board goes to
every other board connected at the time, as a hub does.

Invariant: the hub outlives the boards, so a board can be killed and booted again (its
new QEMU connects again) without the others losing their LAN, which a LAN of VMs linked
to one another directly (one listening, the others connecting) cannot give.

QEMU's stream socket framing: each frame is a 4-byte big-endian length, then the frame.
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


def _read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
