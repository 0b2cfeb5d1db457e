# Included by _fastpath.pyx after _fastpath_relay.pxi and _fastpath_splice.pxi.
# Accepting and dialling inside the relay loop: listeners handed over with
# RelayLoop.listen() are accepted from (accept4, at most _ACCEPT_BATCH per
# readiness report, level-triggered), each client is dialled with a
# non-blocking connect to the next endpoint of its listener's round robin
# (upstream's retry schedule: one attempt per dial timeout, the next endpoint
# each time) and, once connected, relayed by _fastpath_splice.pxi like an
# add()-ed pair, so a plain round-robin connection never touches Python.
# Functions of ``RelayLoop self``, run on the relay thread; the twin is
# kproxy/_fastpath_accept_py.py and its docstrings are the specification.
#
# Invariants: a dialling slot is on exactly one timer list (its attempt
# level's) while its backend fd is open; a _Backends is reference counted (the
# listener + one per dialling slot) and freed at zero, so set_backends() never
# pulls a list from under a dial; EMFILE/ENFILE on accept pauses the listener
# with a doubling back-off instead of spinning; accepted slots have id -1 and
# are counted (accepted_active), never reported to on_done.  Uses the
# declarations of _fastpath_relay.pxi and _fastpath_splice.pxi.

from libc.errno cimport (
    errno, EAGAIN, EINTR, ECONNABORTED, EINPROGRESS, EMFILE, ENFILE,
    ETIMEDOUT, ECONNREFUSED, EPROTO, EPERM, ENOBUFS, ENOMEM,
)
from libc.stdlib cimport realloc
from libc.stdint cimport int64_t

cdef extern from "<sys/socket.h>" nogil:
    struct sockaddr:
        pass
    ctypedef unsigned int socklen_t
    int accept4(int fd, sockaddr* addr, socklen_t* alen, int flags)
    int socket(int domain, int kind, int proto)
    int connect(int fd, const sockaddr* addr, socklen_t alen)
    enum:
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        AF_INET
        AF_INET6

cdef extern from "<netinet/in.h>" nogil:
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

cdef int _MAX_LEVELS = 8     # dial attempts (upstream: 4)
cdef int _ACCEPT_BATCH = 64  # accepts per readiness report (level-triggered: fair)
cdef uint64_t _LISTEN_TAG = 1ULL << 62
# Event kinds reported to on_event(listener_id, kind, errno).
cdef int _EV_REFUSED = 1
cdef int _EV_DIAL_FAILED = 2
cdef int _EV_FD_EXHAUSTED = 3
cdef int _EV_ACCEPTING = 4
cdef int _EV_ACCEPT_FAILED = 5

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


cdef int64_t _now(RelayLoop self) noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef int _timeout(RelayLoop self) noexcept nogil:
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
    now = _now(self)
    return 0 if first <= now else <int>(first - now + 1)


cdef void _timers(RelayLoop self) noexcept nogil:
    cdef int k, slot
    cdef Py_ssize_t i
    cdef int64_t now = -1
    cdef epoll_event ev
    for k in range(self._nlevels):
        # Deadlines of one level are in insertion order (same timeout each).
        while self._thead[k] >= 0:
            if now < 0:
                now = _now(self)
            slot = self._thead[k]
            if self._conns[slot].deadline > now:
                break
            _dial_failed(self, slot, ETIMEDOUT)
    for i in range(self._nls):
        if self._ls[i].used and self._ls[i].paused:
            if now < 0:
                now = _now(self)
            if self._ls[i].resume_at <= now:
                self._ls[i].paused = False
                ev.events = EPOLLIN
                ev.data.u64 = _LISTEN_TAG | <uint64_t>i
                epoll_ctl(self._ep, EPOLL_CTL_MOD, self._ls[i].fd, &ev)


cdef void _timer_add(RelayLoop self, int slot) noexcept nogil:
    cdef _Conn* c = &self._conns[slot]
    cdef int k = c.attempt
    c.deadline = _now(self) + self._levels_ms[k]
    c.tnext = -1
    c.tprev = self._ttail[k]
    if self._ttail[k] >= 0:
        self._conns[self._ttail[k]].tnext = slot
    else:
        self._thead[k] = slot
    self._ttail[k] = slot


cdef void _timer_del(RelayLoop self, int slot) noexcept nogil:
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


cdef void _be_release(RelayLoop self, _Backends* be) noexcept nogil:
    if be != NULL:
        be.refs -= 1
        if be.refs == 0:
            free(be)


cdef Py_ssize_t _listener_index(RelayLoop self, int lid) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(self._nls):
        if self._ls[i].used and self._ls[i].id == lid:
            return i
    return -1


cdef void _listen(RelayLoop self, int fd, int lid) noexcept nogil:
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
            _event(self, lid, _EV_ACCEPT_FAILED, ENOMEM)
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
        _event(self, lid, _EV_ACCEPT_FAILED, errno)
        _unlisten_at(self, idx)


cdef void _unlisten_at(RelayLoop self, Py_ssize_t idx) noexcept nogil:
    cdef _Listener* l = &self._ls[idx]
    epoll_ctl(self._ep, EPOLL_CTL_DEL, l.fd, NULL)
    close(l.fd)
    _be_release(self, l.be)
    l.be = NULL
    l.used = False


cdef void _close_listeners(RelayLoop self) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(self._nls):
        if self._ls[i].used:
            _unlisten_at(self, i)


cdef void _set_backends(RelayLoop self, int lid, _Backends* be) noexcept nogil:
    cdef Py_ssize_t idx = _listener_index(self, lid)
    if idx < 0:
        free(be)
        return
    # Dialling connections keep the list they started with (new connections only).
    _be_release(self, self._ls[idx].be)
    self._ls[idx].be = be
    self._ls[idx].rr = 0


cdef void _accept(RelayLoop self, Py_ssize_t idx) noexcept nogil:
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
                l.resume_at = _now(self) + l.delay_ms
                l.delay_ms = min(l.delay_ms * 2, self._pause_max_ms)
                ev.events = 0
                ev.data.u64 = _LISTEN_TAG | <uint64_t>idx
                epoll_ctl(self._ep, EPOLL_CTL_MOD, l.fd, &ev)
                _event(self, l.id, _EV_FD_EXHAUSTED, err)
                return
            if (err == ECONNABORTED or err == EPROTO or err == EPERM or err == ENOBUFS
                    or err == ENOMEM):
                continue  # concerns that one connection only
            _event(self, l.id, _EV_ACCEPT_FAILED, err)
            _unlisten_at(self, idx)
            return
        if l.exhausted:
            l.exhausted = False
            l.delay_ms = self._pause_min_ms
            _event(self, l.id, _EV_ACCEPTING, 0)
        self.accepted += 1
        if l.be == NULL or l.be.n == 0:
            self.refused += 1
            _reset_fd(self, cfd)
            _event(self, l.id, _EV_REFUSED, 0)
            continue
        if self._nfree == 0 and _grow(self) != 0:
            _reset_fd(self, cfd)
            _event(self, l.id, _EV_REFUSED, ENOMEM)
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
        _dial(self, <int>slot)


cdef void _reset_fd(RelayLoop self, int fd) noexcept nogil:
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(linger))
    close(fd)


cdef void _dial(RelayLoop self, int slot) noexcept nogil:
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
                _event(self, c.lid, _EV_FD_EXHAUSTED, err)
                _dial_give_up(self, slot)
                return
            _event(self, c.lid, _EV_DIAL_FAILED, err)
            c.attempt += 1
            continue
        setsockopt(bfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
        r = connect(bfd, <sockaddr*>a.sa, a.len)
        if r == 0 or errno == EINPROGRESS:
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            ev.data.u64 = ((<uint64_t>slot) << 1) | 1
            if epoll_ctl(self._ep, EPOLL_CTL_ADD, bfd, &ev) == 0:
                c.fd[1] = bfd
                _timer_add(self, slot)
                return  # EPOLLOUT (or the error) reports the outcome
            err = errno
        else:
            err = errno
        close(bfd)
        self.dial_failures += 1
        _event(self, c.lid, _EV_DIAL_FAILED, err)
        c.attempt += 1
    _dial_give_up(self, slot)


cdef void _dial_failed(RelayLoop self, int slot, int err) noexcept nogil:
    cdef _Conn* c = &self._conns[slot]
    _timer_del(self, slot)
    epoll_ctl(self._ep, EPOLL_CTL_DEL, c.fd[1], NULL)
    close(c.fd[1])
    c.fd[1] = -1
    self.dial_failures += 1
    _event(self, c.lid, _EV_DIAL_FAILED, err)
    c.attempt += 1
    _dial(self, slot)


cdef void _dial_give_up(RelayLoop self, int slot) noexcept nogil:
    # No endpoint answered: reset the client at once.
    cdef _Conn* c = &self._conns[slot]
    self.refused += 1
    _event(self, c.lid, _EV_REFUSED, ECONNREFUSED)
    c.error = ECONNREFUSED
    _finish(self, slot)


cdef void _connected(RelayLoop self, Py_ssize_t slot, uint32_t events) noexcept nogil:
    cdef _Conn* c = &self._conns[slot]
    cdef int err = 0, d
    cdef unsigned int n = sizeof(int)
    cdef epoll_event ev
    if getsockopt(c.fd[1], SOL_SOCKET, SO_ERROR, &err, &n) != 0:
        err = errno
    if err == 0 and events & (EPOLLERR | EPOLLHUP):
        err = ECONNREFUSED
    if err != 0:
        _dial_failed(self, <int>slot, err)
        return
    if not events & EPOLLOUT:
        return  # not decided yet
    _timer_del(self, <int>slot)
    _be_release(self, c.be)
    c.be = NULL
    c.dialling = False
    for d in range(2):
        _pipe_or_copy(self, c, d)
    # The backend leg is registered already (same events, same tag).
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    ev.data.u64 = (<uint64_t>slot) << 1
    if epoll_ctl(self._ep, EPOLL_CTL_ADD, c.fd[0], &ev) != 0:
        c.error = errno
    if c.error:
        _finish(self, slot)
        return
    _service(self, slot)


cdef void _event(RelayLoop self, int lid, int kind, int error) noexcept nogil:
    if self._on_event is not None:
        self._record(lid, 0, 0, error, kind)
