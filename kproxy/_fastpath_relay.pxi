# Included by _fastpath.pyx.  The TCP relay loop: splice(2) through pooled
# pipes in an edge-triggered epoll loop that runs with the GIL released in one
# relay thread.  Python hands over fd pairs through a control pipe and gets a
# completion callback per pair.  The twin is kproxy/_fastpath_relay_py.py (same
# state machine in Python, os.splice); its docstrings are the specification.

from libc.errno cimport errno, EAGAIN, EINTR, EINVAL, ENOSYS, ECONNABORTED
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
    enum:
        SHUT_WR
        SOL_SOCKET
        SO_LINGER
        SO_ERROR
        MSG_NOSIGNAL
        MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

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
cdef int _MAX_EVENTS = 256

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

ctypedef struct _Conn:
    bint used
    int64_t id
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

    def __cinit__(self):
        self._ep = -1
        self._ctl_r = -1
        self._ctl_w = -1
        self._conns = NULL
        self._free = NULL
        self._pool = NULL
        self._done = NULL
        self._closed = True

    def __init__(self, on_done, *, pipe_size=262144, force_copy=False, max_pooled_pipes=64):
        cdef int fds[2]
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
            n = epoll_wait(self._ep, events, _MAX_EVENTS, -1)
            if n < 0:
                if errno == EINTR:
                    continue
                break
            for i in range(n):
                tag = events[i].data.u64
                if tag == 0xFFFFFFFFFFFFFFFFULL:
                    self._control()
                    continue
                slot = <Py_ssize_t>(tag >> 1)
                side = <int>(tag & 1)
                if slot >= self._cap or not self._conns[slot].used:
                    continue  # a pair closed earlier in this batch
                if events[i].events & EPOLLERR:
                    self._check_error(slot, side)
                self._service(slot)
            if self._ndone:
                self._report()
        self._abort_all()
        if self._ndone:
            self._report()

    cdef void _control(self) noexcept nogil:
        cdef _CtlMsg msgs[64]
        cdef ssize_t r
        cdef Py_ssize_t k
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
        self._record(cid, 0, 0, ECONNABORTED)

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
        for d in range(2):
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
        self._record(c.id, c.nbytes[0], c.nbytes[1], c.error)

    cdef void _abort_all(self) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self._cap):
            if self._conns[i].used:
                if not self._conns[i].error:
                    self._conns[i].error = ECONNABORTED
                self._finish(i)

    cdef void _record(self, int64_t cid, uint64_t up, uint64_t down, int error) noexcept nogil:
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
        self._ndone += 1

    cdef void _report(self) noexcept nogil:
        cdef Py_ssize_t i
        with gil:
            for i in range(self._ndone):
                try:
                    self._on_done(
                        self._done[i].id, self._done[i].up, self._done[i].down, self._done[i].error
                    )
                except BaseException:
                    _relay_log.exception("relay completion callback failed")
        self._ndone = 0
