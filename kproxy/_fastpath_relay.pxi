# Included by _fastpath.pyx, then _fastpath_splice.pxi and _fastpath_accept.pxi.
# RelayLoop: one relay thread running an edge-triggered epoll loop with the
# GIL released.  Python hands over fd pairs (add) and listening sockets
# (listen) through a control pipe and gets a completion callback per pair
# (on_done) and listener events (on_event), batched.  This file owns the
# class: its state, the caller API, the control pipe, the loop's dispatch and
# the completion queue.  The byte relay of a pair is _fastpath_splice.pxi and
# accepting/dialling is _fastpath_accept.pxi; both are module-level cdef
# functions of ``RelayLoop self`` (Cython allows no include inside a cdef class
# body; a direct C call costs no more than a cdef method's vtable call).  The
# twin is kproxy/_fastpath_relay_py.py with the same split
# (_fastpath_splice_py.py, _fastpath_accept_py.py); its docstrings are the
# specification.
#
# Invariants: after __init__ only the relay thread touches the slots, the pipe
# pool and the listeners; callers only write 24-byte control messages (atomic,
# < PIPE_BUF; a full pipe blocks the caller).  Control messages are handled
# before the other events of the same epoll batch.  epoll tags: _CTL_TAG (all
# ones) the control pipe, _LISTEN_TAG | index a listener, slot << 1 | side a
# pair's leg.  Callbacks run only in _report(), with the GIL, after the batch.
# The epoll, fcntl and unistd declarations below serve all three files.

from libc.errno cimport errno, EINTR, ECONNABORTED
from libc.stdlib cimport realloc
from libc.stdint cimport int64_t

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    enum:
        F_GETFL
        F_SETFL
        O_NONBLOCK
        O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int pipe2(int* fds, int flags)
    int close(int fd)
    ssize_t read(int fd, void* buf, size_t n)
    ssize_t write(int fd, const void* buf, size_t n)

import logging as _logging
import threading as _threading

cdef int _OP_ADD = 1
cdef int _OP_ABORT_ALL = 2
cdef int _OP_STOP = 3
cdef int _OP_LISTEN = 4      # a = fd (the loop owns it), b = listener id
cdef int _OP_UNLISTEN = 5    # a = listener id
cdef int _OP_BACKENDS = 6    # a = listener id, id = the _Backends* (the loop owns it)
cdef int _MAX_EVENTS = 256
cdef uint64_t _CTL_TAG = 0xFFFFFFFFFFFFFFFFULL

ctypedef struct _CtlMsg:
    int32_t op
    int32_t a
    int32_t b
    int32_t pad
    int64_t id

ctypedef struct _Done:
    int64_t id
    uint64_t up
    uint64_t down
    int error
    int kind                # 0: a pair ended (on_done); else an _EV_* (on_event)

_relay_log = _logging.getLogger("kproxy.fastpath.relay")


cdef class RelayLoop:
    """Relays fd pairs until both directions end (see the twin for the contract)."""

    cdef int _ep
    cdef int _ctl_r
    cdef int _ctl_w
    cdef _Conn* _conns
    cdef Py_ssize_t _cap
    cdef int* _free
    cdef Py_ssize_t _nfree
    cdef _Pipe* _pool
    cdef Py_ssize_t _npool
    cdef Py_ssize_t _max_pool
    cdef Py_ssize_t _pipe_size
    cdef bint _force_copy
    cdef bint _stopping
    cdef _Done* _done
    cdef Py_ssize_t _ndone
    cdef Py_ssize_t _done_cap
    cdef object _on_done
    cdef object _thread
    cdef bint _closed
    cdef readonly uint64_t active
    cdef readonly uint64_t started
    cdef readonly uint64_t finished
    cdef readonly uint64_t aborted
    cdef readonly uint64_t bytes_relayed
    cdef readonly uint64_t copy_fallbacks
    cdef _Listener* _ls
    cdef Py_ssize_t _nls
    cdef int64_t _levels_ms[8]
    cdef int _nlevels
    cdef int _thead[8]
    cdef int _ttail[8]
    cdef int64_t _pause_min_ms
    cdef int64_t _pause_max_ms
    cdef object _on_event
    cdef readonly uint64_t accepted
    cdef readonly uint64_t accepted_active
    cdef readonly uint64_t refused
    cdef readonly uint64_t dial_failures

    EV_REFUSED = 1
    EV_DIAL_FAILED = 2
    EV_FD_EXHAUSTED = 3
    EV_ACCEPTING = 4
    EV_ACCEPT_FAILED = 5

    def __cinit__(self):
        self._ep = -1
        self._ctl_r = -1
        self._ctl_w = -1
        self._conns = NULL
        self._free = NULL
        self._pool = NULL
        self._done = NULL
        self._ls = NULL
        self._closed = True

    def __init__(
        self,
        on_done,
        *,
        pipe_size=262144,
        force_copy=False,
        max_pooled_pipes=64,
        on_event=None,
        dial_timeouts=(0.25, 0.5, 1.0, 2.0),
        accept_pause=(0.05, 1.0),
    ):
        cdef int fds[2]
        cdef int k
        if not 1 <= len(dial_timeouts) <= _MAX_LEVELS:
            raise ValueError(f"1 to {_MAX_LEVELS} dial timeouts, not {len(dial_timeouts)}")
        self._nlevels = len(dial_timeouts)
        for k in range(_MAX_LEVELS):
            self._thead[k] = self._ttail[k] = -1
            self._levels_ms[k] = 0
        for k in range(self._nlevels):
            self._levels_ms[k] = max(1, <int64_t>(dial_timeouts[k] * 1000))
        self._pause_min_ms = max(1, <int64_t>(accept_pause[0] * 1000))
        self._pause_max_ms = max(self._pause_min_ms, <int64_t>(accept_pause[1] * 1000))
        self._on_event = on_event
        self._on_done = on_done
        self._pipe_size = pipe_size
        self._force_copy = force_copy
        self._max_pool = max_pooled_pipes
        self._pool = <_Pipe*>calloc(max(1, max_pooled_pipes), sizeof(_Pipe))
        if self._pool == NULL:
            raise MemoryError()
        self._ep = epoll_create1(EPOLL_CLOEXEC)
        if self._ep < 0:
            raise OSError(errno, "epoll_create1")
        # The write end blocks (a full control pipe back-pressures start()); the
        # loop reads it non-blocking.  Messages are 24 bytes < PIPE_BUF: atomic.
        if pipe2(fds, O_CLOEXEC) != 0:
            raise OSError(errno, "pipe2")
        self._ctl_r = fds[0]
        self._ctl_w = fds[1]
        fcntl(self._ctl_r, F_SETFL, fcntl(self._ctl_r, F_GETFL) | O_NONBLOCK)
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = 0xFFFFFFFFFFFFFFFFULL
        if epoll_ctl(self._ep, EPOLL_CTL_ADD, self._ctl_r, &ev) != 0:
            raise OSError(errno, "epoll_ctl")
        self._closed = False
        self._thread = _threading.Thread(target=self._run, name="kproxy-relay", daemon=True)
        self._thread.start()

    def __dealloc__(self):
        # Only reached without close() when __init__ failed or the owner forgot it;
        # the thread holds a reference, so the loop is not running here.
        cdef Py_ssize_t i
        if self._conns != NULL:
            for i in range(self._cap):
                if self._conns[i].used:
                    self._conns[i].error = ECONNABORTED
                    _finish(self, i)
        _close_listeners(self)
        _close_pool(self)
        if self._ep >= 0:
            close(self._ep)
        if self._ctl_r >= 0:
            close(self._ctl_r)
        if self._ctl_w >= 0:
            close(self._ctl_w)
        free(self._conns)
        free(self._free)
        free(self._pool)
        free(self._done)
        free(self._ls)

    cdef int _send(self, int op, int a, int b, int64_t cid) except -1:
        cdef _CtlMsg m
        cdef ssize_t r
        if self._closed:
            raise RuntimeError("relay loop is closed")
        m.op = op
        m.a = a
        m.b = b
        m.pad = 0
        m.id = cid
        with nogil:
            r = write(self._ctl_w, &m, sizeof(_CtlMsg))
        if r != sizeof(_CtlMsg):
            raise OSError(errno, "relay control pipe")
        return 0

    def add(self, int client_fd, int backend_fd, conn_id):
        """Relay the connected pair; the loop owns (and will close) both fds from here on."""
        self._send(_OP_ADD, client_fd, backend_fd, conn_id)

    def abort_all(self):
        """Reset and close every pair being relayed (pairs added later are not affected)."""
        self._send(_OP_ABORT_ALL, 0, 0, 0)

    def listen(self, int fd, int listener_id):
        """Accept from the listening socket ``fd`` (the loop owns it from here on).

        Until set_backends() names endpoints, every connection is reset.
        """
        self._send(_OP_LISTEN, fd, listener_id, 0)

    def unlisten(self, int listener_id):
        """Stop accepting and close the loop's fd; connections already accepted go on."""
        self._send(_OP_UNLISTEN, listener_id, 0, 0)

    def set_backends(self, int listener_id, endpoints):
        """The (ip, port) round robin of new connections of the listener (in order)."""
        cdef Py_ssize_t n = len(endpoints), i
        cdef _Backends* be = <_Backends*>calloc(1, sizeof(_Backends) + max(0, n - 1) * sizeof(_Addr))
        cdef sockaddr_in* a4
        cdef sockaddr_in6* a6
        cdef bytes host
        if be == NULL:
            raise MemoryError()
        try:
            be.refs = 1
            be.n = n
            for i in range(n):
                host = str(endpoints[i][0]).strip("[]").encode("ascii")
                port = int(endpoints[i][1])
                if not 0 < port < 65536:
                    raise ValueError(f"bad port {port}")
                if b":" in host:
                    a6 = <sockaddr_in6*>be.addr[i].sa
                    a6.sin6_family = AF_INET6
                    a6.sin6_port = htons(port)
                    if inet_pton(AF_INET6, host, &a6.sin6_addr) != 1:
                        raise ValueError(f"bad address {host!r}")
                    be.addr[i].len = sizeof(sockaddr_in6)
                    be.addr[i].family = AF_INET6
                else:
                    a4 = <sockaddr_in*>be.addr[i].sa
                    a4.sin_family = AF_INET
                    a4.sin_port = htons(port)
                    if inet_pton(AF_INET, host, &a4.sin_addr) != 1:
                        raise ValueError(f"bad address {host!r}")
                    be.addr[i].len = sizeof(sockaddr_in)
                    be.addr[i].family = AF_INET
            self._send(_OP_BACKENDS, listener_id, 0, <int64_t><Py_ssize_t>be)
        except BaseException:
            free(be)
            raise

    def close(self):
        """Abort every pair, stop the thread and release the loop's own fds; idempotent."""
        if self._closed:
            return
        self._send(_OP_STOP, 0, 0, 0)
        self._closed = True
        self._thread.join()
        _close_pool(self)
        close(self._ep)
        close(self._ctl_r)
        close(self._ctl_w)
        self._ep = self._ctl_r = self._ctl_w = -1

    @property
    def closed(self):
        return self._closed

    def stats(self):
        return {
            "active": self.active,
            "started": self.started,
            "finished": self.finished,
            "aborted": self.aborted,
            "bytes": self.bytes_relayed,
            "copy_fallbacks": self.copy_fallbacks,
            "pooled_pipes": self._npool,
            "accepted": self.accepted,
            "accepted_active": self.accepted_active,
            "refused": self.refused,
            "dial_failures": self.dial_failures,
        }

    def _run(self):
        with nogil:
            self._loop()

    # -- everything below runs on the relay thread --------------------------------

    cdef void _loop(self) noexcept nogil:
        cdef epoll_event events[256]
        cdef int n, i, side
        cdef uint64_t tag
        cdef Py_ssize_t slot
        while not self._stopping:
            n = epoll_wait(self._ep, events, _MAX_EVENTS, _timeout(self))
            if n < 0:
                if errno == EINTR:
                    continue
                break
            # Control first: a set_backends() issued before a client connected must
            # apply to it even when both are reported in the same batch.
            for i in range(n):
                if events[i].data.u64 == _CTL_TAG:
                    self._control()
                    break
            for i in range(n):
                tag = events[i].data.u64
                if tag == _CTL_TAG:
                    continue
                if tag & _LISTEN_TAG:
                    _accept(self, <Py_ssize_t>(tag & ~_LISTEN_TAG))
                    continue
                slot = <Py_ssize_t>(tag >> 1)
                side = <int>(tag & 1)
                if slot >= self._cap or not self._conns[slot].used:
                    continue  # a pair closed earlier in this batch
                if self._conns[slot].dialling:
                    _connected(self, slot, events[i].events)
                    continue
                if events[i].events & EPOLLERR:
                    _check_error(self, slot, side)
                _service(self, slot)
            _timers(self)
            if self._ndone:
                self._report()
        _abort_all(self)
        _close_listeners(self)
        if self._ndone:
            self._report()

    cdef void _control(self) noexcept nogil:
        cdef _CtlMsg msgs[64]
        cdef ssize_t r
        cdef Py_ssize_t k, i
        while True:
            r = read(self._ctl_r, msgs, sizeof(msgs))
            if r <= 0:
                return
            for k in range(r // sizeof(_CtlMsg)):
                if msgs[k].op == _OP_ADD:
                    _add(self, msgs[k].a, msgs[k].b, msgs[k].id)
                elif msgs[k].op == _OP_ABORT_ALL:
                    _abort_all(self)
                elif msgs[k].op == _OP_STOP:
                    self._stopping = True
                elif msgs[k].op == _OP_LISTEN:
                    _listen(self, msgs[k].a, msgs[k].b)
                elif msgs[k].op == _OP_UNLISTEN:
                    i = _listener_index(self, msgs[k].a)
                    if i >= 0:
                        _unlisten_at(self, i)
                elif msgs[k].op == _OP_BACKENDS:
                    _set_backends(self, msgs[k].a, <_Backends*><Py_ssize_t>msgs[k].id)

    cdef void _record(
        self, int64_t cid, uint64_t up, uint64_t down, int error, int kind
    ) noexcept nogil:
        cdef Py_ssize_t cap
        cdef _Done* grown
        if self._ndone == self._done_cap:
            cap = self._done_cap * 2 if self._done_cap else 64
            grown = <_Done*>realloc(self._done, cap * sizeof(_Done))
            if grown == NULL:
                return  # the pair is closed either way; only its report is lost
            self._done = grown
            self._done_cap = cap
        self._done[self._ndone].id = cid
        self._done[self._ndone].up = up
        self._done[self._ndone].down = down
        self._done[self._ndone].error = error
        self._done[self._ndone].kind = kind
        self._ndone += 1

    cdef void _report(self) noexcept nogil:
        cdef Py_ssize_t i
        with gil:
            for i in range(self._ndone):
                try:
                    if self._done[i].kind:
                        self._on_event(self._done[i].id, self._done[i].kind, self._done[i].error)
                    else:
                        self._on_done(
                            self._done[i].id,
                            self._done[i].up,
                            self._done[i].down,
                            self._done[i].error,
                        )
                except BaseException:
                    _relay_log.exception("relay completion callback failed")
        self._ndone = 0
