# Included by _fastpath.pyx.  The TCP relay loop: splice(2) through pooled
# pipes in an edge-triggered epoll loop that runs with the GIL released in one
# relay thread.  Python hands over fd pairs through a control pipe and gets a
# completion callback per pair.  Listeners handed over with listen() are
# accepted from, dialled (round robin, upstream's retry schedule) and relayed
# here too, so a plain round-robin connection never touches Python.  The twin is kproxy/_fastpath_relay_py.py (same
# state machine in Python, os.splice); its docstrings are the specification.

from libc.errno cimport (
    errno, EAGAIN, EINTR, EINVAL, ENOSYS, ECONNABORTED, EINPROGRESS, EMFILE, ENFILE,
    ETIMEDOUT, ECONNREFUSED, EPROTO, EPERM, ENOBUFS, ENOMEM,
)
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
    ssize_t splice(int fd_in, void* off_in, int fd_out, void* off_out, size_t n, unsigned int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETFL
        F_SETFL
        O_NONBLOCK
        O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int pipe2(int* fds, int flags)
    int close(int fd)
    ssize_t read(int fd, void* buf, size_t n)
    ssize_t write(int fd, const void* buf, size_t n)

cdef extern from "<sys/socket.h>" nogil:
    struct linger:
        int l_onoff
        int l_linger
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void* val, unsigned int len)
    int getsockopt(int fd, int level, int name, void* val, unsigned int* len)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    struct sockaddr:
        pass
    ctypedef unsigned int socklen_t
    int accept4(int fd, sockaddr* addr, socklen_t* alen, int flags)
    int socket(int domain, int kind, int proto)
    int connect(int fd, const sockaddr* addr, socklen_t alen)
    enum:
        SHUT_WR
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        AF_INET
        AF_INET6
        SOL_SOCKET
        SO_LINGER
        SO_ERROR
        MSG_NOSIGNAL
        MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr
    unsigned short htons(unsigned short v)

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    enum:
        CLOCK_MONOTONIC

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

import logging as _logging
import threading as _threading

RELAY_COPY_BUFFER = 65536
cdef Py_ssize_t _COPY_BUF = 65536
# Never SPLICE_F_MORE: it corks the socket and costs ~200 ms per small message.
cdef unsigned int _SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
cdef int _OP_ADD = 1
cdef int _OP_ABORT_ALL = 2
cdef int _OP_STOP = 3
cdef int _OP_LISTEN = 4      # a = fd (the loop owns it), b = listener id
cdef int _OP_UNLISTEN = 5    # a = listener id
cdef int _OP_BACKENDS = 6    # a = listener id, id = the _Backends* (the loop owns it)
cdef int _MAX_EVENTS = 256
cdef int _MAX_LEVELS = 8     # dial attempts (upstream: 4)
cdef int _ACCEPT_BATCH = 64  # accepts per readiness report (level-triggered: fair)
cdef uint64_t _CTL_TAG = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t _LISTEN_TAG = 1ULL << 62
# Event kinds reported to on_event(listener_id, kind, errno).
cdef int _EV_REFUSED = 1
cdef int _EV_DIAL_FAILED = 2
cdef int _EV_FD_EXHAUSTED = 3
cdef int _EV_ACCEPTING = 4
cdef int _EV_ACCEPT_FAILED = 5

ctypedef struct _CtlMsg:
    int32_t op
    int32_t a
    int32_t b
    int32_t pad
    int64_t id

ctypedef struct _Pipe:
    int r
    int w
    Py_ssize_t size

ctypedef struct _Addr:
    socklen_t len
    int family
    uint8_t sa[28]          # sockaddr_in or sockaddr_in6

ctypedef struct _Backends:
    Py_ssize_t refs         # the listener's reference + one per dialling connection
    Py_ssize_t n
    _Addr addr[1]           # n entries (allocated past the end)

ctypedef struct _Listener:
    bint used
    int id
    int fd
    _Backends* be
    uint64_t rr
    bint paused
    bint exhausted          # in an EMFILE episode (reported once it ends)
    int64_t resume_at
    int64_t delay_ms

ctypedef struct _Conn:
    bint used
    int64_t id
    bint dialling           # accepted here, backend connect in progress
    int lidx                # its listener (events), while dialling
    int lid
    _Backends* be
    uint64_t first          # rr position of the first attempt
    int attempt
    int64_t deadline
    int tprev               # timer list of its attempt level (slot indices, -1 ends)
    int tnext
    int fd[2]
    _Pipe pipe[2]          # direction d carries fd[d] -> fd[1 - d]
    Py_ssize_t pending[2]  # bytes read from fd[d] not yet written to fd[1 - d]
    bint eof[2]
    bint done[2]           # FIN passed on with shutdown(SHUT_WR)
    bint copy[2]
    uint8_t* buf[2]
    Py_ssize_t boff[2]
    uint64_t nbytes[2]
    int error

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
                    self._finish(i)
        self._close_listeners()
        self._close_pool()
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
        self._close_pool()
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
            n = epoll_wait(self._ep, events, _MAX_EVENTS, self._timeout())
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
                    self._accept(<Py_ssize_t>(tag & ~_LISTEN_TAG))
                    continue
                slot = <Py_ssize_t>(tag >> 1)
                side = <int>(tag & 1)
                if slot >= self._cap or not self._conns[slot].used:
                    continue  # a pair closed earlier in this batch
                if self._conns[slot].dialling:
                    self._connected(slot, events[i].events)
                    continue
                if events[i].events & EPOLLERR:
                    self._check_error(slot, side)
                self._service(slot)
            self._timers()
            if self._ndone:
                self._report()
        self._abort_all()
        self._close_listeners()
        if self._ndone:
            self._report()

    # -- accept and dial (listeners handed over with listen()) ----------------------

    cdef int64_t _now(self) noexcept nogil:
        cdef timespec ts
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000

    cdef int _timeout(self) noexcept nogil:
        # The earliest dial deadline or accept resumption; -1 (block) when none.
        cdef int64_t first = -1, now
        cdef int k
        cdef Py_ssize_t i
        for k in range(self._nlevels):
            if self._thead[k] >= 0:
                if first < 0 or self._conns[self._thead[k]].deadline < first:
                    first = self._conns[self._thead[k]].deadline
        for i in range(self._nls):
            if self._ls[i].used and self._ls[i].paused:
                if first < 0 or self._ls[i].resume_at < first:
                    first = self._ls[i].resume_at
        if first < 0:
            return -1
        now = self._now()
        return 0 if first <= now else <int>(first - now + 1)

    cdef void _timers(self) noexcept nogil:
        cdef int k, slot
        cdef Py_ssize_t i
        cdef int64_t now = -1
        cdef epoll_event ev
        for k in range(self._nlevels):
            # Deadlines of one level are in insertion order (same timeout each).
            while self._thead[k] >= 0:
                if now < 0:
                    now = self._now()
                slot = self._thead[k]
                if self._conns[slot].deadline > now:
                    break
                self._dial_failed(slot, ETIMEDOUT)
        for i in range(self._nls):
            if self._ls[i].used and self._ls[i].paused:
                if now < 0:
                    now = self._now()
                if self._ls[i].resume_at <= now:
                    self._ls[i].paused = False
                    ev.events = EPOLLIN
                    ev.data.u64 = _LISTEN_TAG | <uint64_t>i
                    epoll_ctl(self._ep, EPOLL_CTL_MOD, self._ls[i].fd, &ev)

    cdef void _timer_add(self, int slot) noexcept nogil:
        cdef _Conn* c = &self._conns[slot]
        cdef int k = c.attempt
        c.deadline = self._now() + self._levels_ms[k]
        c.tnext = -1
        c.tprev = self._ttail[k]
        if self._ttail[k] >= 0:
            self._conns[self._ttail[k]].tnext = slot
        else:
            self._thead[k] = slot
        self._ttail[k] = slot

    cdef void _timer_del(self, int slot) noexcept nogil:
        cdef _Conn* c = &self._conns[slot]
        cdef int k = c.attempt
        if c.tprev >= 0:
            self._conns[c.tprev].tnext = c.tnext
        elif self._thead[k] == slot:
            self._thead[k] = c.tnext
        if c.tnext >= 0:
            self._conns[c.tnext].tprev = c.tprev
        elif self._ttail[k] == slot:
            self._ttail[k] = c.tprev
        c.tprev = c.tnext = -1

    cdef void _be_release(self, _Backends* be) noexcept nogil:
        if be != NULL:
            be.refs -= 1
            if be.refs == 0:
                free(be)

    cdef Py_ssize_t _listener_index(self, int lid) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self._nls):
            if self._ls[i].used and self._ls[i].id == lid:
                return i
        return -1

    cdef void _listen(self, int fd, int lid) noexcept nogil:
        cdef Py_ssize_t i, idx = -1
        cdef _Listener* grown
        cdef epoll_event ev
        for i in range(self._nls):
            if not self._ls[i].used:
                idx = i
                break
        if idx < 0:
            grown = <_Listener*>realloc(self._ls, (self._nls + 1) * sizeof(_Listener))
            if grown == NULL:
                close(fd)
                self._event(lid, _EV_ACCEPT_FAILED, ENOMEM)
                return
            self._ls = grown
            idx = self._nls
            self._nls += 1
        memset(&self._ls[idx], 0, sizeof(_Listener))
        self._ls[idx].used = True
        self._ls[idx].id = lid
        self._ls[idx].fd = fd
        self._ls[idx].delay_ms = self._pause_min_ms
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        # Level-triggered: a batch limit leaves the rest for the next turn.
        ev.events = EPOLLIN
        ev.data.u64 = _LISTEN_TAG | <uint64_t>idx
        if epoll_ctl(self._ep, EPOLL_CTL_ADD, fd, &ev) != 0:
            self._event(lid, _EV_ACCEPT_FAILED, errno)
            self._unlisten_at(idx)

    cdef void _unlisten_at(self, Py_ssize_t idx) noexcept nogil:
        cdef _Listener* l = &self._ls[idx]
        epoll_ctl(self._ep, EPOLL_CTL_DEL, l.fd, NULL)
        close(l.fd)
        self._be_release(l.be)
        l.be = NULL
        l.used = False

    cdef void _close_listeners(self) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self._nls):
            if self._ls[i].used:
                self._unlisten_at(i)

    cdef void _set_backends(self, int lid, _Backends* be) noexcept nogil:
        cdef Py_ssize_t idx = self._listener_index(lid)
        if idx < 0:
            free(be)
            return
        # Dialling connections keep the list they started with (new connections only).
        self._be_release(self._ls[idx].be)
        self._ls[idx].be = be
        self._ls[idx].rr = 0

    cdef void _accept(self, Py_ssize_t idx) noexcept nogil:
        cdef _Listener* l
        cdef int cfd, k, one = 1, err
        cdef Py_ssize_t slot
        cdef _Conn* c
        cdef epoll_event ev
        if idx >= self._nls or not self._ls[idx].used:
            return
        for k in range(_ACCEPT_BATCH):
            l = &self._ls[idx]  # _grow() below never moves listeners, but stay explicit
            cfd = accept4(l.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if cfd < 0:
                err = errno
                if err == EAGAIN or err == EINTR:
                    return
                if err == EMFILE or err == ENFILE:
                    # Back-pressure, not a crash: the client waits in the backlog.
                    l.paused = True
                    l.exhausted = True
                    l.resume_at = self._now() + l.delay_ms
                    l.delay_ms = min(l.delay_ms * 2, self._pause_max_ms)
                    ev.events = 0
                    ev.data.u64 = _LISTEN_TAG | <uint64_t>idx
                    epoll_ctl(self._ep, EPOLL_CTL_MOD, l.fd, &ev)
                    self._event(l.id, _EV_FD_EXHAUSTED, err)
                    return
                if (err == ECONNABORTED or err == EPROTO or err == EPERM or err == ENOBUFS
                        or err == ENOMEM):
                    continue  # concerns that one connection only
                self._event(l.id, _EV_ACCEPT_FAILED, err)
                self._unlisten_at(idx)
                return
            if l.exhausted:
                l.exhausted = False
                l.delay_ms = self._pause_min_ms
                self._event(l.id, _EV_ACCEPTING, 0)
            self.accepted += 1
            if l.be == NULL or l.be.n == 0:
                self.refused += 1
                self._reset_fd(cfd)
                self._event(l.id, _EV_REFUSED, 0)
                continue
            if self._nfree == 0 and self._grow() != 0:
                self._reset_fd(cfd)
                self._event(l.id, _EV_REFUSED, ENOMEM)
                continue
            setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
            self._nfree -= 1
            slot = self._free[self._nfree]
            c = &self._conns[slot]
            memset(c, 0, sizeof(_Conn))
            c.used = True
            c.id = -1
            c.dialling = True
            c.lidx = <int>idx
            c.lid = l.id
            c.be = l.be
            l.be.refs += 1
            c.first = l.rr
            l.rr += 1
            c.fd[0] = cfd
            c.fd[1] = -1
            c.tprev = c.tnext = -1
            c.pipe[0].r = c.pipe[0].w = c.pipe[1].r = c.pipe[1].w = -1
            self.started += 1
            self.active += 1
            self.accepted_active += 1
            self._dial(<int>slot)

    cdef void _reset_fd(self, int fd) noexcept nogil:
        cdef linger lg
        lg.l_onoff = 1
        lg.l_linger = 0
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(linger))
        close(fd)

    cdef void _dial(self, int slot) noexcept nogil:
        # Upstream's tryConnect: one attempt per dial timeout, the next endpoint each time.
        cdef _Conn* c = &self._conns[slot]
        cdef _Addr* a
        cdef int bfd, r, err, one = 1
        cdef epoll_event ev
        while c.attempt < self._nlevels:
            a = &c.be.addr[(c.first + <uint64_t>c.attempt) % <uint64_t>c.be.n]
            bfd = socket(a.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            if bfd < 0:
                err = errno
                self.dial_failures += 1
                if err == EMFILE or err == ENFILE:
                    self._event(c.lid, _EV_FD_EXHAUSTED, err)
                    self._dial_give_up(slot)
                    return
                self._event(c.lid, _EV_DIAL_FAILED, err)
                c.attempt += 1
                continue
            setsockopt(bfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
            r = connect(bfd, <sockaddr*>a.sa, a.len)
            if r == 0 or errno == EINPROGRESS:
                ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
                ev.data.u64 = ((<uint64_t>slot) << 1) | 1
                if epoll_ctl(self._ep, EPOLL_CTL_ADD, bfd, &ev) == 0:
                    c.fd[1] = bfd
                    self._timer_add(slot)
                    return  # EPOLLOUT (or the error) reports the outcome
                err = errno
            else:
                err = errno
            close(bfd)
            self.dial_failures += 1
            self._event(c.lid, _EV_DIAL_FAILED, err)
            c.attempt += 1
        self._dial_give_up(slot)

    cdef void _dial_failed(self, int slot, int err) noexcept nogil:
        cdef _Conn* c = &self._conns[slot]
        self._timer_del(slot)
        epoll_ctl(self._ep, EPOLL_CTL_DEL, c.fd[1], NULL)
        close(c.fd[1])
        c.fd[1] = -1
        self.dial_failures += 1
        self._event(c.lid, _EV_DIAL_FAILED, err)
        c.attempt += 1
        self._dial(slot)

    cdef void _dial_give_up(self, int slot) noexcept nogil:
        # No endpoint answered: reset the client at once.
        cdef _Conn* c = &self._conns[slot]
        self.refused += 1
        self._event(c.lid, _EV_REFUSED, ECONNREFUSED)
        c.error = ECONNREFUSED
        self._finish(slot)

    cdef void _connected(self, Py_ssize_t slot, uint32_t events) noexcept nogil:
        cdef _Conn* c = &self._conns[slot]
        cdef int err = 0, d
        cdef unsigned int n = sizeof(int)
        cdef epoll_event ev
        if getsockopt(c.fd[1], SOL_SOCKET, SO_ERROR, &err, &n) != 0:
            err = errno
        if err == 0 and events & (EPOLLERR | EPOLLHUP):
            err = ECONNREFUSED
        if err != 0:
            self._dial_failed(<int>slot, err)
            return
        if not events & EPOLLOUT:
            return  # not decided yet
        self._timer_del(<int>slot)
        self._be_release(c.be)
        c.be = NULL
        c.dialling = False
        for d in range(2):
            if self._force_copy:
                c.copy[d] = True
            elif self._pipe_get(&c.pipe[d]) != 0:
                c.copy[d] = True
            if c.copy[d]:
                c.buf[d] = <uint8_t*>malloc(_COPY_BUF)
                if c.buf[d] == NULL:
                    c.error = ECONNABORTED
        # The backend leg is registered already (same events, same tag).
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = (<uint64_t>slot) << 1
        if epoll_ctl(self._ep, EPOLL_CTL_ADD, c.fd[0], &ev) != 0:
            c.error = errno
        if c.error:
            self._finish(slot)
            return
        self._service(slot)

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
                    self._add(msgs[k].a, msgs[k].b, msgs[k].id)
                elif msgs[k].op == _OP_ABORT_ALL:
                    self._abort_all()
                elif msgs[k].op == _OP_STOP:
                    self._stopping = True
                elif msgs[k].op == _OP_LISTEN:
                    self._listen(msgs[k].a, msgs[k].b)
                elif msgs[k].op == _OP_UNLISTEN:
                    i = self._listener_index(msgs[k].a)
                    if i >= 0:
                        self._unlisten_at(i)
                elif msgs[k].op == _OP_BACKENDS:
                    self._set_backends(msgs[k].a, <_Backends*><Py_ssize_t>msgs[k].id)

    cdef int _grow(self) noexcept nogil:
        cdef Py_ssize_t cap = self._cap * 2 if self._cap else 64
        cdef Py_ssize_t i
        cdef _Conn* conns = <_Conn*>realloc(self._conns, cap * sizeof(_Conn))
        cdef int* fr
        if conns == NULL:
            return -1
        self._conns = conns
        fr = <int*>realloc(self._free, cap * sizeof(int))
        if fr == NULL:
            return -1
        self._free = fr
        memset(&self._conns[self._cap], 0, (cap - self._cap) * sizeof(_Conn))
        # Hand out low slots first (the free list is a stack).
        for i in range(cap - 1, self._cap - 1, -1):
            self._free[self._nfree] = <int>i
            self._nfree += 1
        self._cap = cap
        return 0

    cdef int _pipe_get(self, _Pipe* p) noexcept nogil:
        cdef int fds[2]
        cdef int size
        if self._npool > 0:
            self._npool -= 1
            p[0] = self._pool[self._npool]
            return 0
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
            return -1
        p.r = fds[0]
        p.w = fds[1]
        # A bigger pipe moves more per splice; refused (pipe-user-pages-soft) → default 64 KiB.
        size = fcntl(fds[1], F_SETPIPE_SZ, <int>self._pipe_size)
        p.size = size if size > 0 else 65536
        return 0

    cdef void _pipe_put(self, _Pipe* p, bint clean) noexcept nogil:
        if p.r < 0:
            return
        if clean and self._npool < self._max_pool:
            self._pool[self._npool] = p[0]
            self._npool += 1
        else:
            close(p.r)
            close(p.w)
        p.r = p.w = -1

    cdef void _close_pool(self) noexcept nogil:
        while self._npool > 0:
            self._npool -= 1
            close(self._pool[self._npool].r)
            close(self._pool[self._npool].w)

    cdef void _add(self, int cfd, int bfd, int64_t cid) noexcept nogil:
        cdef Py_ssize_t slot
        cdef _Conn* c
        cdef int one = 1, d
        cdef epoll_event ev
        self.started += 1
        self.active += 1
        if self._nfree == 0 and self._grow() != 0:
            self._refuse(cfd, bfd, cid)
            return
        self._nfree -= 1
        slot = self._free[self._nfree]
        c = &self._conns[slot]
        memset(c, 0, sizeof(_Conn))
        c.used = True
        c.id = cid
        c.fd[0] = cfd
        c.fd[1] = bfd
        c.pipe[0].r = c.pipe[0].w = c.pipe[1].r = c.pipe[1].w = -1
        for d in range(2):
            fcntl(c.fd[d], F_SETFL, fcntl(c.fd[d], F_GETFL) | O_NONBLOCK)
            setsockopt(c.fd[d], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
            if self._force_copy:
                c.copy[d] = True
            elif self._pipe_get(&c.pipe[d]) != 0:
                c.copy[d] = True  # out of pipes: copy this pair instead of refusing it
            if c.copy[d]:
                c.buf[d] = <uint8_t*>malloc(_COPY_BUF)
                if c.buf[d] == NULL:
                    c.error = ECONNABORTED
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            ev.data.u64 = ((<uint64_t>slot) << 1) | <uint64_t>d
            if epoll_ctl(self._ep, EPOLL_CTL_ADD, c.fd[d], &ev) != 0:
                c.error = errno
        if c.error:
            self._finish(slot)
            return
        self._service(slot)

    cdef void _refuse(self, int cfd, int bfd, int64_t cid) noexcept nogil:
        cdef linger lg
        lg.l_onoff = 1
        lg.l_linger = 0
        setsockopt(cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(linger))
        setsockopt(bfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(linger))
        close(cfd)
        close(bfd)
        self.active -= 1
        self.aborted += 1
        self._record(cid, 0, 0, ECONNABORTED, 0)

    cdef void _check_error(self, Py_ssize_t slot, int side) noexcept nogil:
        cdef int err = 0
        cdef unsigned int n = sizeof(int)
        cdef _Conn* c = &self._conns[slot]
        if getsockopt(c.fd[side], SOL_SOCKET, SO_ERROR, &err, &n) == 0 and err != 0:
            if not c.error:
                c.error = err

    cdef int _pump(self, _Conn* c, int d) noexcept nogil:
        # Move fd[d] -> fd[1 - d] until both would block; 0 or -1 with c.error set.
        cdef int src = c.fd[d]
        cdef int dst = c.fd[1 - d]
        cdef ssize_t r
        if c.done[d]:
            return 0
        while True:
            if c.pending[d] > 0:
                if c.copy[d]:
                    r = send(dst, c.buf[d] + c.boff[d], c.pending[d], MSG_NOSIGNAL | MSG_DONTWAIT)
                else:
                    r = splice(c.pipe[d].r, NULL, dst, NULL, c.pending[d], _SPLICE_FLAGS)
                if r > 0:
                    c.pending[d] -= r
                    c.nbytes[d] += r
                    self.bytes_relayed += r
                    if c.copy[d]:
                        c.boff[d] = c.boff[d] + r if c.pending[d] else 0
                    continue
                if r < 0 and errno == EAGAIN:
                    return 0  # the peer's window is full; EPOLLOUT brings us back
                if r < 0 and errno == EINTR:
                    continue
                c.error = errno if r < 0 else ECONNABORTED
                return -1
            if c.eof[d]:
                break
            if c.copy[d]:
                r = recv(src, c.buf[d], _COPY_BUF, MSG_DONTWAIT)
            else:
                r = splice(src, NULL, c.pipe[d].w, NULL, c.pipe[d].size, _SPLICE_FLAGS)
            if r > 0:
                c.pending[d] = r
                continue
            if r == 0:
                c.eof[d] = True
                continue
            if errno == EAGAIN:
                return 0
            if errno == EINTR:
                continue
            if not c.copy[d] and (errno == EINVAL or errno == ENOSYS):
                # splice refused for this fd type: HAProxy's fallback to a copy.
                c.buf[d] = <uint8_t*>malloc(_COPY_BUF)
                if c.buf[d] == NULL:
                    c.error = ECONNABORTED
                    return -1
                c.copy[d] = True
                self.copy_fallbacks += 1
                continue
            c.error = errno
            return -1
        # EOF seen and everything before it delivered: pass the FIN on.
        if shutdown(dst, SHUT_WR) != 0:
            c.error = errno
            return -1
        c.done[d] = True
        return 0

    cdef void _service(self, Py_ssize_t slot) noexcept nogil:
        cdef _Conn* c = &self._conns[slot]
        if not c.error:
            if self._pump(c, 0) == 0:
                self._pump(c, 1)
        if c.error or (c.done[0] and c.done[1]):
            self._finish(slot)

    cdef void _finish(self, Py_ssize_t slot) noexcept nogil:
        cdef _Conn* c = &self._conns[slot]
        cdef linger lg
        cdef bint clean = not c.error
        cdef int d
        lg.l_onoff = 1
        lg.l_linger = 0
        if c.dialling:
            if c.fd[1] >= 0:
                self._timer_del(<int>slot)
            self._be_release(c.be)
            c.be = NULL
            c.dialling = False
        for d in range(2):
            if c.fd[d] < 0:
                continue
            if not clean:
                # An error on either leg resets both, so the reset propagates.
                setsockopt(c.fd[d], SOL_SOCKET, SO_LINGER, &lg, sizeof(linger))
            close(c.fd[d])
            self._pipe_put(&c.pipe[d], clean and c.pending[d] == 0)
            free(c.buf[d])
            c.buf[d] = NULL
        c.used = False
        self._free[self._nfree] = <int>slot
        self._nfree += 1
        self.active -= 1
        if clean:
            self.finished += 1
        else:
            self.aborted += 1
        if c.id < 0:
            # Accepted here: no per-pair report (Python never saw it; counters say it).
            self.accepted_active -= 1
        else:
            self._record(c.id, c.nbytes[0], c.nbytes[1], c.error, 0)

    cdef void _abort_all(self) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self._cap):
            if self._conns[i].used:
                if not self._conns[i].error:
                    self._conns[i].error = ECONNABORTED
                self._finish(i)

    cdef void _event(self, int lid, int kind, int error) noexcept nogil:
        if self._on_event is not None:
            self._record(lid, 0, 0, error, kind)

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
