# Included by _fastpath.pyx after _fastpath_relay.pxi.  The byte relay of
# RelayLoop's pairs: splice(2) through pooled pipes (SPLICE_F_MOVE |
# SPLICE_F_NONBLOCK), falling back to recv/send for a direction whose fd type
# refuses splice (EINVAL/ENOSYS, as HAProxy does), half-close passed on with
# shutdown(SHUT_WR), an error on either leg resetting both (SO_LINGER 0), and
# the per-pair and loop-wide byte counters.  Also the slot table the pairs live
# in (_Conn, grown by doubling, a free list of indices).  Functions of
# ``RelayLoop self``, run on the relay thread; the twin is
# kproxy/_fastpath_splice_py.py and its docstrings are the specification.
#
# Invariants: each leg of a slot is closed exactly once, by _finish() (or by
# _refuse() when no slot could be had); the free list is a stack, so low slots
# are reused first; a pipe returns to the pool only when its pair ended clean
# and nothing was left in it; active == started - finished - aborted.  Uses the
# epoll, fcntl and unistd declarations of _fastpath_relay.pxi.

from libc.errno cimport errno, EAGAIN, EINTR, EINVAL, ENOSYS, ECONNABORTED
from libc.stdlib cimport realloc
from libc.stdint cimport int64_t

cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, void* off_in, int fd_out, void* off_out, size_t n, unsigned int flags)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ

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

RELAY_COPY_BUFFER = 65536
cdef Py_ssize_t _COPY_BUF = 65536
# Never SPLICE_F_MORE: it corks the socket and costs ~200 ms per small message.
cdef unsigned int _SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK

ctypedef struct _Pipe:
    int r
    int w
    Py_ssize_t size

# One slot: a pair being relayed or, while ``dialling``, a client accepted by
# _fastpath_accept.pxi whose backend connect is in progress (dialling ..
# tnext are that file's).
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


cdef int _grow(RelayLoop self) noexcept nogil:
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


cdef void _pipe_or_copy(RelayLoop self, _Conn* c, int d) noexcept nogil:
    # Direction d gets a pooled pipe, or a copy buffer (force_copy, or out of
    # pipes: copying a pair beats refusing it); no buffer either aborts the pair.
    if self._force_copy:
        c.copy[d] = True
    elif _pipe_get(self, &c.pipe[d]) != 0:
        c.copy[d] = True
    if c.copy[d]:
        c.buf[d] = <uint8_t*>malloc(_COPY_BUF)
        if c.buf[d] == NULL:
            c.error = ECONNABORTED


cdef int _pipe_get(RelayLoop self, _Pipe* p) noexcept nogil:
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


cdef void _pipe_put(RelayLoop self, _Pipe* p, bint clean) noexcept nogil:
    if p.r < 0:
        return
    if clean and self._npool < self._max_pool:
        self._pool[self._npool] = p[0]
        self._npool += 1
    else:
        close(p.r)
        close(p.w)
    p.r = p.w = -1


cdef void _close_pool(RelayLoop self) noexcept nogil:
    while self._npool > 0:
        self._npool -= 1
        close(self._pool[self._npool].r)
        close(self._pool[self._npool].w)


cdef void _add(RelayLoop self, int cfd, int bfd, int64_t cid) noexcept nogil:
    cdef Py_ssize_t slot
    cdef _Conn* c
    cdef int one = 1, d
    cdef epoll_event ev
    self.started += 1
    self.active += 1
    if self._nfree == 0 and _grow(self) != 0:
        _refuse(self, cfd, bfd, cid)
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
        _pipe_or_copy(self, c, d)
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = ((<uint64_t>slot) << 1) | <uint64_t>d
        if epoll_ctl(self._ep, EPOLL_CTL_ADD, c.fd[d], &ev) != 0:
            c.error = errno
    if c.error:
        _finish(self, slot)
        return
    _service(self, slot)


cdef void _refuse(RelayLoop self, int cfd, int bfd, int64_t cid) noexcept nogil:
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


cdef void _check_error(RelayLoop self, Py_ssize_t slot, int side) noexcept nogil:
    cdef int err = 0
    cdef unsigned int n = sizeof(int)
    cdef _Conn* c = &self._conns[slot]
    if getsockopt(c.fd[side], SOL_SOCKET, SO_ERROR, &err, &n) == 0 and err != 0:
        if not c.error:
            c.error = err


cdef int _pump(RelayLoop self, _Conn* c, int d) noexcept nogil:
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


cdef void _service(RelayLoop self, Py_ssize_t slot) noexcept nogil:
    cdef _Conn* c = &self._conns[slot]
    if not c.error:
        if _pump(self, c, 0) == 0:
            _pump(self, c, 1)
    if c.error or (c.done[0] and c.done[1]):
        _finish(self, slot)


cdef void _finish(RelayLoop self, Py_ssize_t slot) noexcept nogil:
    cdef _Conn* c = &self._conns[slot]
    cdef linger lg
    cdef bint clean = not c.error
    cdef int d
    lg.l_onoff = 1
    lg.l_linger = 0
    if c.dialling:
        if c.fd[1] >= 0:
            _timer_del(self, <int>slot)
        _be_release(self, c.be)
        c.be = NULL
        c.dialling = False
    for d in range(2):
        if c.fd[d] < 0:
            continue
        if not clean:
            # An error on either leg resets both, so the reset propagates.
            setsockopt(c.fd[d], SOL_SOCKET, SO_LINGER, &lg, sizeof(linger))
        close(c.fd[d])
        _pipe_put(self, &c.pipe[d], clean and c.pending[d] == 0)
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


cdef void _abort_all(RelayLoop self) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(self._cap):
        if self._conns[i].used:
            if not self._conns[i].error:
                self._conns[i].error = ECONNABORTED
            _finish(self, i)
