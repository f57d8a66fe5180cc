"""``--processes N``: a parent that binds every listener once, and N forked workers that accept from them.

One process relays on one core.  Here the parent authorizes the configuration exactly as a
single process would and binds every listener, then forks workers; each runs the usual
Supervisor on the inherited sockets with its share of every service's ``num_workers``, and
the kernel hands each connection to one of the workers waiting in accept().  The parent
relays nothing: it owns the signals, sd_notify, ``/metrics`` and the workers' lives.

A reload starts a new *generation*: the parent reads and authorizes the file (in a child, as
the single process does) and binds the new ports, changing nothing if either fails; then it
forks the new generation on the new configuration and, once all of it accepts, retires the
old one, whose workers close their listeners and let their open connections finish
untouched.  A worker that dies is replaced in its generation, after a pause that grows
while it keeps dying young.

Each worker has a socketpair to the parent, carrying pickled ``(kind, value)`` messages (both
ends are this same program): ``ready`` once it accepts and its figures (``metrics``) when
asked and as it exits; the parent sends ``metrics``, ``retire``, ``drain`` and ``kill``.  The
end of that socket tells the parent that a worker died, and a worker that its parent died.
Counters of workers that have exited are kept in the totals, so they never go backwards.

The parent's main greenlet is its one dispatcher, as gunicorn's arbiter loop is: signal
handlers, the workers' watchers and the backoff timers only enqueue events, and the main
greenlet alone acts on them, so it alone forks, and only when its hub is idle.  Signals
that arrive while a reload is pending or running fold into one more reload.  A new worker
starts clean: before anything can run there it discards the parent's hub, with the
parent's greenlets and watchers, and closes the parent's descriptors; it runs on a hub of
its own, where no code of the parent's can wake.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import struct
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, NoReturn

import gevent
import gevent.os
import gevent.socket
from gevent.event import Event
from gevent.hub import Hub, get_hub
from gevent.lock import Semaphore
from gevent.pool import Group
from gevent.queue import Empty, Queue
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from vsockproxy.allowlist import NotAllowed
from vsockproxy.config import ConfigError, FileConfig, Options, load_file
from vsockproxy.listen import Listen, ListenError
from vsockproxy.loader import close_inherited_fds, load_file_in_child, reap
from vsockproxy.metrics import Metrics, ServiceMetrics
from vsockproxy.metrics_server import MetricsServer
from vsockproxy.notify import Notifier
from vsockproxy.supervisor import (STATUS_INTERVAL, Authorized, StartupError, Supervisor, log_listening,
                                   reload_once, start_metrics_server, summary_of)

log = logging.getLogger("vsockproxy")

#: How long a scrape, the summary or STATUS waits for the workers' figures; a late worker's last ones count.
ANSWER_TIMEOUT = 1.0
#: A worker that dies sooner than this after its start died young: repeated, the next one waits...
YOUNG = 5.0
#: ...first this long, twice as long each time it happens again, at most MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: Past --shutdown-grace, how long workers may take to exit before they are killed.
EXIT_MARGIN = 5.0
_HEADER = struct.Struct("!I")


def share(num_workers: int, processes: int, index: int) -> int:
    """Worker ``index``'s part of a service's ``num_workers``: an even split, the remainder spread, at least 1."""
    return max(1, num_workers // processes + (index < num_workers % processes))


# --------------------------------------------------------------------------- the parent

class Workers:
    """The parent of ``--processes N``: listeners, workers, signals, sd_notify and the totals of the figures.

    ``listen`` makes each service's listening socket, as for Supervisor.
    """

    def __init__(self, options: Options, listen: Listen, notifier: Notifier | None = None) -> None:
        self.options = options
        self.listen = listen
        self.count = options.processes
        self.notifier = notifier if notifier is not None else Notifier()
        self.registry = CollectorRegistry()
        self.registry.register(_Totals(self))
        self._listeners: dict[int, socket.socket] = {}
        self._current: _Generation | None = None
        self._processes: dict[int, _Process] = {}
        self._exited: dict[str, ServiceMetrics] = {}  # counters of workers that have exited, by service
        self._created: dict[str, float] = {}
        self._greenlets = Group()  # every greenlet of the parent's own, which a new worker ends in its copy
        self._events: Queue = Queue()  # (kind, value): what the main greenlet dispatches
        self._all_exited = Event()
        self._stopping = Event()
        self._reload_lock = Semaphore()
        self._reload_requested = False
        self._handlers: list = []
        self._metrics_server: MetricsServer | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def serve(self) -> None:
        """Start, then serve until SIGTERM or SIGINT; a second one during the drain ends connections.

        Must run in the main greenlet: it dispatches every event, and forks.  As
        Supervisor.serve: the handlers go in first, start-up errors propagate, and the
        signals' previous dispositions come back at the end.
        """
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        previous = {signum: signal.getsignal(signum) for signum in handled}
        self._handlers = [gevent.signal_handler(signum, self._events.put, ("signal", signum)) for signum in handled]
        try:
            if self.start():
                self._greenlets.spawn(self._refresh)
                while not self._stopping.is_set():
                    if self._reload_requested:
                        self._reload_requested = False
                        self.reload()
                    else:
                        self._dispatch(*self._events.get())
            self.drain(self.options.shutdown_grace)
        finally:
            self._greenlets.kill(block=False)
            for handler in self._handlers:
                handler.cancel()
            for signum, disposition in previous.items():
                if disposition is not None:
                    signal.signal(signum, disposition)
            for listener in self._listeners.values():
                listener.close()
            if self._metrics_server is not None:
                self._metrics_server.stop(timeout=0)
            self.notifier.close()

    def start(self) -> bool:
        """Authorize, bind every listener (all or none), fork the workers and wait until all accept.

        Returns False if a drain began first.  Raises ConfigError, NotAllowed, ListenError, StartupError.
        """
        generation = self._plan(load_file)
        self._listeners = self._bind(generation.authorized)
        if self.options.metrics_address:
            try:
                self._start_metrics(self.options.metrics_address)
            except StartupError:
                for listener in self._listeners.values():
                    listener.close()
                raise
        self._current = generation
        if not self._launch(generation):
            return False
        for port, authorized in sorted(generation.authorized.items()):
            log_listening(port, authorized)
        log.info("%d worker processes accept on every listener (PIDs %s)", self.count, generation.pids())
        self.notifier.ready(self.status())
        return True

    def _plan(self, read: Callable[[str], FileConfig]) -> _Generation:
        """A generation's authorized services, from the file as ``read`` gives it; the workers' template."""
        template = _WorkerSupervisor(replace(self.options, metrics_address=None),
                                     lambda port: self._listeners[port], Notifier(""))
        return _Generation(self.count, template, template.authorize(read))

    def _bind(self, ports: Iterable[int]) -> dict[int, socket.socket]:
        """A listener for each port (all or none)."""
        listeners: dict[int, socket.socket] = {}
        try:
            for port in ports:
                listeners[port] = self.listen(port)
        except ListenError:
            for listener in listeners.values():
                listener.close()
            raise
        return listeners

    def _start_metrics(self, address: str) -> None:
        self._metrics_server = start_metrics_server(address, self.registry)

    def _launch(self, generation: _Generation) -> bool:
        """Fork the generation's workers; True once all of them accept, False if a drain began first."""
        for index in range(self.count):
            self._fork(generation, index)
        self._dispatch_until(lambda: generation.ready.is_set() or self._stopping.is_set())
        return generation.ready.is_set()

    # -- the dispatcher ------------------------------------------------------------------------

    def _dispatch_until(self, done: Callable[[], bool], deadline: float | None = None) -> bool:
        """Dispatch events until ``done()`` or the deadline (monotonic); returns ``done()``."""
        while not done():
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return False
            try:
                event = self._events.get(timeout=timeout)
            except Empty:
                continue
            self._dispatch(*event)
        return True

    def _dispatch_queued(self) -> None:
        """Dispatch what is queued now, without waiting."""
        while not self._events.empty():
            self._dispatch(*self._events.get())

    def _dispatch(self, kind: str, value) -> None:
        """The one place that acts on an event; runs in the main greenlet only, so only it forks."""
        if kind == "signal":
            self._on_signal(value)
        elif kind == "ready":
            value.generation.check_ready()
        elif kind == "exited":
            self._replace(value)
        elif kind == "respawn":
            generation, index = value
            if not (generation.retired or self._stopping.is_set()):
                self._fork(generation, index)

    def _on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT drain (a second one ends connections), SIGHUP asks for a reload, SIGUSR1 logs."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self._stopping.is_set():
                self.kill_connections()
            self._stopping.set()
        elif signum == signal.SIGHUP:
            if self._stopping.is_set():
                log.warning("reload refused: shutting down")
                return
            if (self._current is None or not self._current.ready.is_set()) and not self._reload_requested:
                log.info("reload requested while starting: reloading once started")
            self._reload_requested = True  # one more reload, however many signals come meanwhile
        elif signum == signal.SIGUSR1:
            self._greenlets.spawn(self._log_summary)

    def reload(self) -> bool:
        """Apply the file as it is now in a new generation of workers, or change nothing."""
        return reload_once(self._reload_lock, self._stopping, self.notifier, self._reload, self.status)

    def _reload(self) -> bool:
        try:
            generation = self._plan(load_file_in_child)
            added = self._bind(port for port in generation.authorized if port not in self._listeners)
        except (ConfigError, NotAllowed, ListenError) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            return False
        self._dispatch_queued()  # what came while authorizing waited on the loader and DNS
        if self._stopping.is_set():  # the drain began meanwhile
            for listener in added.values():
                listener.close()
            log.warning("reload refused: shutting down")
            return False
        old = self._current
        assert old is not None
        for port in [port for port in self._listeners if port not in generation.authorized]:
            self._listeners.pop(port).close()  # before forking: the new workers must not hold it
        self._listeners.update(added)
        if not self._launch(generation):
            return False  # the drain reaches the new workers too
        self.poll()
        self._current = generation
        old.retire()
        for port in sorted(set(old.authorized) - set(generation.authorized)):
            log.info("reload: vsock port %d no longer served (%d open connection(s) continue)",
                     port, old.active(str(port)))
        for port in sorted(set(old.authorized) & set(generation.authorized)):
            new, before = generation.authorized[port], old.authorized[port]
            if (new.service, new.target) != (before.service, before.target):
                log.info("reload: vsock port %d now forwards to %s", port, new)
        for port in sorted(added):
            log.info("reload: listening on vsock port %d, forwarding to %s", port, generation.authorized[port])
        log.info("reload applied: %d service(s)", len(generation.authorized))
        return True

    def drain(self, grace: float) -> None:
        """Every worker of every generation stops accepting and gets ``grace`` seconds for its connections."""
        self._stopping.set()
        for listener in self._listeners.values():
            listener.close()
        self._listeners = {}
        self.poll()
        active = self._active()
        log.info("stopping: listeners closed, waiting up to %gs for %d open connection(s)", grace, active)
        self.notifier.stopping(f"draining {active} connection(s)")
        for process in list(self._processes.values()):
            process.tell("drain")
        if not self._dispatch_until(self._all_exited.is_set, time.monotonic() + grace + EXIT_MARGIN):
            for process in list(self._processes.values()):
                log.warning("worker PID %d still running %g s after the grace period: killing it",
                            process.pid, EXIT_MARGIN)
                process.kill()
            self._dispatch_until(self._all_exited.is_set, time.monotonic() + EXIT_MARGIN)
        log.info("stopped")

    def kill_connections(self) -> None:
        log.info("second signal: closing open connections now")
        for process in list(self._processes.values()):
            process.tell("kill")

    # -- the workers' lives --------------------------------------------------------------------

    def _fork(self, generation: _Generation, index: int) -> None:
        """Start worker ``index`` of the generation; from the main greenlet only (see _leave_parent)."""
        gevent.idle()  # until no event of the parent's is pending and no callback queued: none can run there
        ours, theirs = gevent.socket.socketpair()
        pid = gevent.os.fork_gevent()
        if pid == 0:
            ours.close()
            self._become_worker(generation, index, theirs)
        theirs.close()
        process = _Process(pid, index, generation, ours, time.monotonic())
        generation.processes[index] = process
        self._processes[pid] = process
        self._all_exited.clear()
        self._greenlets.spawn(self._watch, process)

    def _watch(self, process: _Process) -> None:
        """Take the worker's messages until it exits; then keep its counters and tell the dispatcher."""
        while True:
            try:
                message = _receive(process.control)
            except OSError:
                message = None
            if message is None:
                break
            kind, value = message
            if kind == "ready":
                process.ready = True
                self._events.put(("ready", process))
            elif kind == "metrics":
                process.state = value
                answered, process.answered = process.answered, Event()
                answered.set()
        process.control.close()
        process.answered.set()  # no answer will come: a poll need not wait for one
        process.status = reap(process.pid)
        self._forget(process)
        self._events.put(("exited", process))

    def _replace(self, process: _Process) -> None:
        """A worker has exited: if it died, start a new one, at once or after its backoff."""
        if process.leaving or process.generation.retired or self._stopping.is_set():
            log.debug("worker PID %d exited (%s)", process.pid, _describe(process.status))
            return
        generation, index = process.generation, process.index
        delay = generation.backoff(index, time.monotonic() - process.started)
        if not delay:
            log.warning("worker PID %d exited (%s); starting a new one", process.pid, _describe(process.status))
            self._fork(generation, index)
            return
        log.warning("worker PID %d exited (%s), %d time(s) in a row within %g s of its start; "
                    "starting a new one in %g s", process.pid, _describe(process.status),
                    generation.young_deaths[index], YOUNG, delay)
        self._greenlets.spawn(self._respawn_later, delay, generation, index)

    def _respawn_later(self, delay: float, generation: _Generation, index: int) -> None:
        gevent.sleep(delay)
        self._events.put(("respawn", (generation, index)))

    def _forget(self, process: _Process) -> None:
        """Drop an exited worker, keeping its counters (its gauges end with it)."""
        del self._processes[process.pid]
        if process.generation.processes.get(process.index) is process:
            del process.generation.processes[process.index]
        for name, state in process.state.items():
            self._exited.setdefault(name, ServiceMetrics(name)).add(state, gauges=False)
        if not self._processes:
            self._all_exited.set()

    def _become_worker(self, generation: _Generation, index: int, control: socket.socket) -> NoReturn:
        """In a new child: let go of what is the parent's, run the worker, exit; never returns."""
        code = 1
        try:
            parents, control_fd = self._leave_parent(generation, control)  # kept to the end: see _leave_parent
            control = gevent.socket.socket(fileno=control_fd)  # on the worker's own hub
            template = generation.template
            template.given = {port: replace(authorized, service=replace(
                authorized.service, num_workers=share(authorized.service.num_workers, self.count, index)))
                for port, authorized in generation.authorized.items()}
            code = _Worker(template, control, self.options.shutdown_grace).run()
        except BaseException as exc:  # a bug: one line, and the parent starts another worker
            log.error("worker PID %d: internal error: %r", os.getpid(), exc)
        finally:
            os._exit(code)

    def _leave_parent(self, generation: _Generation, control: socket.socket) -> tuple[tuple[Hub, object], int]:
        """Discard the parent's hub and close the parent's descriptors in this copy of it, never yielding.

        The hub holds the parent's work: its greenlets and their watchers.  Run here, any of
        them would be the parent's code in a worker (the reap and fork of a sibling that
        exited, an answer to a scrape).  The parent forks only from its main greenlet and only
        once its hub is idle, with no event pending and no callback queued; so the hub is
        destroyed with its loop before anything can wake there, and the worker gets a hub of
        its own.  The parent's objects stay as they are, kept (returned to the caller, which
        holds them to the end) so that collecting them never resumes a greenlet to unwind it;
        their descriptors are closed underneath them, all but the generation's listeners and
        the control socket: a sibling's control socket must end when the parent ends.
        Returns what to keep, and the control socket's descriptor.
        """
        # Orders come from the parent alone.  `systemctl stop` signals the whole control group and a
        # terminal's Ctrl-C the whole process group: the parent forwards those, and a worker that
        # acted on its own copy too would exit while the parent still counted on it.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        control_fd = control.detach()  # the worker wraps it anew, on its own hub
        hub = get_hub()
        loop = hub.loop
        hub.destroy(destroy_loop=True)
        close_inherited_fds([control_fd, *(listener.fileno() for port, listener in self._listeners.items()
                                           if port in generation.authorized)])
        return (hub, loop), control_fd

    # -- reporting -----------------------------------------------------------------------------

    def poll(self) -> None:
        """Ask every live worker for its figures; wait ANSWER_TIMEOUT at most."""
        answers = []
        for process in list(self._processes.values()):
            answers.append(process.answered)
            process.tell("metrics")
        gevent.wait(answers, timeout=ANSWER_TIMEOUT)

    def totals(self) -> Metrics:
        """The figures of every worker, live or exited, summed per service (as of their last answers)."""
        live = list(self._processes.values())
        names = {str(port) for port in self._current.authorized} if self._current is not None else set()
        for process in live:
            names.update(process.state)
        for gone in [name for name in self._exited if name not in names]:  # as a single process drops it
            del self._exited[gone]
            self._created.pop(gone, None)
        metrics = Metrics(CollectorRegistry())
        for name in sorted(names):
            service = metrics.service(name)
            service.created = self._created.setdefault(name, time.time())
            if name in self._exited:
                service.add(self._exited[name].state(), gauges=False)
            for process in live:
                if name in process.state:
                    service.add(process.state[name])
        return metrics

    def _active(self) -> int:
        return sum(state.get("active", 0) for process in self._processes.values() for state in process.state.values())

    def status(self) -> str:
        services = len(self._current.authorized) if self._current is not None else 0
        return f"{services} service(s), {self._active()} active connection(s)"

    def summary(self) -> str:
        """SIGUSR1's line, as a single process words it, with the totals of every worker."""
        if self._current is None:
            return summary_of(())
        totals = self.totals()
        return summary_of((port, authorized.route.target, totals.service(str(port)))
                          for port, authorized in self._current.authorized.items())

    def _log_summary(self) -> None:
        self.poll()
        log.info("%s", self.summary())

    def _refresh(self) -> None:
        """Ask for the workers' figures now and then, not only at scrapes: a worker killed outright
        takes with it what it counted since its last answer.  STATUS goes to systemd each time."""
        while True:
            gevent.sleep(STATUS_INTERVAL)
            self.poll()
            self.notifier.send(STATUS=self.status())



class _Totals:
    """The collector of the parent's ``/metrics``: the workers' figures, asked for at each scrape and summed."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        self.workers.poll()
        yield from self.workers.totals().collect()


@dataclass(eq=False)
class _Generation:
    """Workers forked from one configuration: started together, retired together."""

    size: int
    template: _WorkerSupervisor
    authorized: dict[int, Authorized]
    processes: dict[int, _Process] = field(default_factory=dict)
    ready: Event = field(default_factory=Event)
    retired: bool = False
    young_deaths: dict[int, int] = field(default_factory=dict)

    def check_ready(self) -> None:
        if len(self.processes) == self.size and all(process.ready for process in self.processes.values()):
            self.ready.set()

    def pids(self) -> str:
        return ", ".join(str(process.pid) for _, process in sorted(self.processes.items()))

    def retire(self) -> None:
        self.retired = True
        for process in list(self.processes.values()):
            process.tell("retire")

    def active(self, service: str) -> int:
        return sum(process.state.get(service, {}).get("active", 0) for process in self.processes.values())

    def backoff(self, index: int, lived: float) -> float:
        """How long to wait before replacing worker ``index``: nothing, unless it keeps dying young."""
        deaths = self.young_deaths[index] = self.young_deaths.get(index, 0) + 1 if lived < YOUNG else 0
        return 0.0 if deaths < 2 else min(FIRST_BACKOFF * 2 ** (deaths - 2), MAX_BACKOFF)


@dataclass(eq=False)
class _Process:
    """The parent's view of one worker."""

    pid: int
    index: int
    generation: _Generation
    control: socket.socket
    started: float
    ready: bool = False
    leaving: bool = False  # told to retire or drain: its exit is no failure
    status: int | None = None  # its exit status, once reaped (None also when unknown)
    state: dict = field(default_factory=dict)  # its figures as last reported, by service
    answered: Event = field(default_factory=Event)  # set, and replaced, by each report

    def tell(self, kind: str) -> None:
        if kind in ("retire", "drain"):
            self.leaving = True
        try:
            _send(self.control, (kind, None))
        except OSError:  # exiting already: its watcher hears of it
            pass

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)  # not reaped yet, so the pid is still the worker's
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- a worker

class _WorkerSupervisor(Supervisor):
    """A worker's services: the parent's authorized ones (``given``) on the parent's listeners."""

    given: dict[int, Authorized] | None = None

    def authorize(self, read: Callable[[str], FileConfig] = load_file) -> dict[int, Authorized]:
        """In the parent, the file's; in a worker, what the parent authorized, with the worker's share."""
        return super().authorize(read) if self.given is None else self.given


class _Worker:
    """Serves its generation's services until told to retire or drain, answering the parent meanwhile."""

    def __init__(self, supervisor: _WorkerSupervisor, control: socket.socket, grace: float) -> None:
        self.supervisor = supervisor
        self.control = control
        self.grace = grace
        self._leave = Event()  # retire or drain
        self._hurry = Event()  # drain: the grace period runs
        self._deadline: float | None = None

    def run(self) -> int:
        self.supervisor.start(announce=False)
        _send(self.control, ("ready", None))
        gevent.spawn(self._hear_parent)
        self._leave.wait()
        self._finish()
        try:
            _send(self.control, ("metrics", self.supervisor.metrics.state()))  # the final figures
        except OSError:
            pass
        return 0

    def drain(self) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.grace
        self._leave.set()
        self._hurry.set()

    def _hear_parent(self) -> None:
        while True:
            try:
                message = _receive(self.control)
            except OSError:
                message = None
            if message is None:
                if not self._hurry.is_set():
                    log.warning("worker PID %d: the parent process is gone; draining", os.getpid())
                    self.drain()
                return
            kind = message[0]
            if kind == "metrics":
                _send(self.control, ("metrics", self.supervisor.metrics.state()))
            elif kind == "retire":
                self._leave.set()
            elif kind == "drain":
                self.drain()
            elif kind == "kill":
                for server in self.supervisor.servers.values():
                    server.kill_connections()

    def _finish(self) -> None:
        """Close the listeners; open connections finish, within the grace period once a drain begins."""
        servers = list(self.supervisor.servers.values())
        for server in servers:
            server.close()
        finished = gevent.spawn(lambda: [server.pool.join() for server in servers])
        while not finished.ready():
            if self._deadline is None:
                gevent.wait([finished, self._hurry], count=1)
            else:
                finished.join(timeout=max(0.0, self._deadline - time.monotonic()))
                break
        for server in servers:
            server.pool.kill(block=True, timeout=1)
        finished.kill()


# --------------------------------------------------------------------------- messages

def _send(sock: socket.socket, message: tuple) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _receive(sock: socket.socket) -> tuple | None:
    """The next message, or None at the end of the stream."""
    header = _read(sock, _HEADER.size)
    if header is None:
        return None
    data = _read(sock, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _read(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _describe(status: int | None) -> str:
    if status is None:
        return "status unknown"
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.WEXITSTATUS(status)}"
