"""The worker's Claude processes: at most ``size`` live at once, one per chat, resumed from the
chat's stored session (:class:`ClaudePool`)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from agent.claude import ClaudeError, ClaudeSession, ClaudeSettings, ToolFlags
from agent.host_slots import HostSlots
from agent.persona import Profile
from agent.store import Store
from wabridge import logs

log = logs.get("agent.pool")


def project_dir(config_dir: Path, workdir: Path) -> Path:
    """Where the CLI looks for the transcripts of sessions run in ``workdir``: its path with
    every non-alphanumeric character replaced by ``-`` (as the CLI names it)."""
    return config_dir / "projects" / re.sub(r"[^A-Za-z0-9]", "-", str(workdir.resolve()))


def transcript_path(config_dir: Path, session_id: str) -> Path | None:
    """Where the CLI keeps a session's transcript: ``$CLAUDE_CONFIG_DIR/projects/<slug of the
    cwd>/<session id>.jsonl`` (the slug is the cwd with every non-alphanumeric character
    replaced by ``-``; found by globbing, so a changed slug rule does not matter). None when
    absent (never had a turn, or deleted)."""
    if not session_id or "/" in session_id or session_id.startswith("."):
        return None
    for path in (config_dir / "projects").glob(f"*/{session_id}.jsonl"):
        return path
    return None


class ClaudePool:
    """At most ``size`` live Claude processes; least recently used idle ones close first.

    Processes being started count against ``size`` too. Opening a chat resumes its stored
    session unless its transcript is larger than ``resume_max_bytes``; when the transcript is
    too large or ``--resume`` fails (transcript missing), the chat's session is forgotten with
    seed ``recovery`` and a fresh session is started (the engine seeds its first turn).
    """

    def __init__(self, size: int, idle_timeout: float, settings: ClaudeSettings, root: Path,
                 store: Store, *, resume_max_bytes: int = 10_000_000,
                 tools: Callable[[str, Path], Awaitable[ToolFlags | None]] | None = None
                 ) -> None:
        #: a portable store (PostgreSQL) keeps each chat's transcript, so that a chat moved
        #: to another host resumes with its context instead of being reseeded
        self._mirror = store.portable
        self._mirrored: dict[str, int] = {}  # session id -> transcript bytes in the store
        self._size = size
        self._idle = idle_timeout
        self._settings = settings
        self._root = root
        self._store = store
        self._resume_max_bytes = resume_max_bytes
        self._tools = tools  # a chat's tool flags, asked at each open
        self._live: dict[str, tuple[ClaudeSession, float]] = {}
        self._started_with: dict[str, ClaudeSettings] = {}  # per chat: its process's settings
        self._busy: set[str] = set()
        self._opening: set[str] = set()
        self._closing: set[str] = set()  # taken out of _live, process still closing
        self._cond = asyncio.Condition()
        self.peak = 0  # most processes live at once (diagnostics, tests)
        # the host's Claude budget: a new process waits for the controller's grant
        self.slots: HostSlots | None = None
        self._reclaims: set[asyncio.Task[None]] = set()

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def model(self) -> str:
        return self._settings.model or ""

    @property
    def config_dir(self) -> Path:
        return self._root / "claude"

    def pid(self, chat_id: str) -> int | None:
        """The chat's live Claude process id, if any."""
        entry = self._live.get(chat_id)
        return entry[0].pid if entry else None

    def settings_for(self, profile: Profile | None) -> ClaudeSettings:
        """The settings a chat's process starts with: the host's, the profile's prompt and
        model in their place."""
        if profile is None:
            return self._settings
        return replace(self._settings,
                       system_prompt=profile.system_prompt or self._settings.system_prompt,
                       model=profile.model or self._settings.model)

    async def acquire(self, chat_id: str, profile: Profile | None = None) -> ClaudeSession:
        """The chat's process; one started with another prompt or model is closed first and
        the chat resumed with the new ones (``--system-prompt-snapshot off``: the resumed
        session answers with the current prompt)."""
        settings = self.settings_for(profile)
        while True:
            async with self._cond:
                step = await self._reserve(chat_id, settings)
            if isinstance(step, ClaudeSession):
                if self.slots is not None:
                    self.slots.busy(chat_id)
                return step
            if step is None:
                break
            # Closed outside the lock: other chats keep acquiring and releasing their own
            # processes meanwhile. The slot stays taken (``_closing``) until the process is
            # gone, so at most ``size`` processes ever live.
            await self._finish_close(*step)
        try:
            if self.slots is not None:
                await self.slots.take(chat_id)
            session = await self._open(chat_id, settings)
        except BaseException:
            if self.slots is not None:
                self.slots.gone(chat_id)
            async with self._cond:
                self._busy.discard(chat_id)
                self._opening.discard(chat_id)
                self._cond.notify_all()
            raise
        self._opening.discard(chat_id)
        self._live[chat_id] = (session, time.monotonic())
        self._started_with[chat_id] = settings
        self.peak = max(self.peak, len(self._live))
        return session

    async def _reserve(self, chat_id: str, settings: ClaudeSettings
                       ) -> ClaudeSession | tuple[str, ClaudeSession] | None:
        """Under the lock: the chat's live process; or a process to close first (the chat's
        dead one, or the least recently used idle one), taken out of ``_live``; or None once a
        slot is reserved for opening the chat's process."""
        while True:
            if chat_id in self._closing:
                # its previous process is still closing: never two on one session
                await self._cond.wait()
                continue
            entry = self._live.get(chat_id)
            if entry and entry[0].alive and self._started_with.get(chat_id) == settings:
                self._busy.add(chat_id)
                return entry[0]
            if entry:  # dead, or started with another prompt or model
                return chat_id, self._take(chat_id)
            if len(self._live) + len(self._opening) + len(self._closing) < self._size:
                self._busy.add(chat_id)
                self._opening.add(chat_id)
                return None
            idle = [c for c in self._live if c not in self._busy]
            if idle:
                victim = min(idle, key=lambda c: self._live[c][1])
                return victim, self._take(victim)
            await self._cond.wait()

    async def _open(self, chat_id: str, settings: ClaudeSettings) -> ClaudeSession:
        safe = "".join(c if c.isalnum() else "_" for c in chat_id)[:80]
        workdir = self._root / "chats" / safe
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_dir = self.config_dir
        config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._tools is not None:
            settings = replace(settings, tool_flags=await self._tools(chat_id, workdir))
        row = self._store.chat(chat_id)
        resume = row.session_id if row else None
        if resume:
            if self._mirror:
                await self.restore_transcript(chat_id, resume, workdir)
            transcript = transcript_path(config_dir, resume)
            size = transcript.stat().st_size if transcript else 0
            if size > self._resume_max_bytes:
                log.warning("claude.transcript_too_large", chat_id=chat_id, session_id=resume,
                            bytes=size, limit=self._resume_max_bytes)
                self._store.set_session(chat_id, None, seed="recovery")
                resume = None
        try:
            session = await ClaudeSession.open(settings=settings, workdir=workdir,
                                               config_dir=config_dir, resume_session_id=resume)
        except ClaudeError as exc:
            if exc.code != "resume_failed":
                raise
            log.warning("claude.resume_failed", chat_id=chat_id, session_id=resume,
                        error=str(exc))
            self._store.set_session(chat_id, None, seed="recovery")
            session = await ClaudeSession.open(settings=settings, workdir=workdir,
                                               config_dir=config_dir, resume_session_id=None)
        log.info("claude.started", chat_id=chat_id, pid=session.pid, resumed=bool(resume))
        return session

    async def release(self, chat_id: str) -> None:
        """The chat's turn is over: its process goes back to the pool (and, on a portable
        store, its transcript into the store)."""
        async with self._cond:
            self._busy.discard(chat_id)
            session = self._live[chat_id][0] if chat_id in self._live else None
            if session is not None:
                self._live[chat_id] = (session, time.monotonic())
                if self.slots is not None:
                    self.slots.idle(chat_id)
            self._cond.notify_all()
        if self._mirror and session is not None and session.session_id:
            await self.mirror_transcript(chat_id, session.session_id)

    async def mirror_transcript(self, chat_id: str, session_id: str) -> bool:
        """Copy the session's transcript into the store when it grew; not one larger than
        ``resume_max_bytes`` (it would not be resumed anyway: the reseed applies)."""
        path = transcript_path(self.config_dir, session_id)
        if path is None:
            return False
        body = await asyncio.to_thread(path.read_bytes)
        if len(body) > self._resume_max_bytes or self._mirrored.get(session_id) == len(body):
            return False
        self._store.save_transcript(chat_id, session_id, body)
        self._mirrored[session_id] = len(body)
        log.info("claude.transcript_saved", chat_id=chat_id, session_id=session_id,
                 bytes=len(body))
        return True

    async def restore_transcript(self, chat_id: str, session_id: str, workdir: Path) -> bool:
        """Before ``--resume`` on a host that lacks the transcript: write back the one the
        store keeps, where the CLI run in ``workdir`` looks for it (this host's state
        directory may differ from the old one's). False when there is nothing to do."""
        if ("/" in session_id or session_id.startswith(".")
                or transcript_path(self.config_dir, session_id) is not None):
            return False
        body = self._store.transcript(chat_id, session_id)
        if body is None:
            return False
        target = project_dir(self.config_dir, workdir) / f"{session_id}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        await asyncio.to_thread(target.write_bytes, body)
        self._mirrored[session_id] = len(body)
        log.info("claude.transcript_restored", chat_id=chat_id, session_id=session_id,
                 bytes=len(body))
        return True

    async def discard(self, chat_id: str) -> None:
        """Close the chat's process (if any) and let others use its slot."""
        async with self._cond:
            session = self._take(chat_id) if chat_id in self._live else None
            self._busy.discard(chat_id)
            self._cond.notify_all()
        if session is not None:
            await self._finish_close(chat_id, session)

    def _take(self, chat_id: str) -> ClaudeSession:
        """Under the lock: move a live process to ``_closing`` (it keeps its slot)."""
        session = self._live.pop(chat_id)[0]
        self._started_with.pop(chat_id, None)
        self._closing.add(chat_id)
        return session

    async def _finish_close(self, chat_id: str, session: ClaudeSession) -> None:
        try:
            await session.close()
            log.info("claude.closed", chat_id=chat_id)
        finally:
            async with self._cond:
                self._closing.discard(chat_id)
                if self.slots is not None:
                    self.slots.gone(chat_id)
                self._cond.notify_all()

    def reclaim(self, chat_id: str) -> None:
        """The controller wants the chat's slot back: its process closes if idle; a chat in a
        turn answers ``busy`` (asked again once idle, if still needed)."""
        task = asyncio.get_running_loop().create_task(self._reclaim(chat_id))
        self._reclaims.add(task)
        task.add_done_callback(self._reclaims.discard)

    async def _reclaim(self, chat_id: str) -> None:
        async with self._cond:
            entry = self._live.get(chat_id)
            session = self._take(chat_id) if entry and chat_id not in self._busy else None
            busy = chat_id in self._busy or chat_id in self._opening
        if session is not None:
            log.info("claude.reclaimed", chat_id=chat_id)
            await self._finish_close(chat_id, session)
        elif self.slots is not None:
            if busy:
                self.slots.busy(chat_id)
            elif chat_id not in self._closing:
                self.slots.gone(chat_id)

    async def reap_idle(self) -> None:
        now = time.monotonic()
        async with self._cond:
            idle = [(c, self._take(c)) for c, (_, used) in list(self._live.items())
                    if c not in self._busy and now - used > self._idle]
        for chat_id, _ in idle:
            log.info("claude.idle", chat_id=chat_id)
        await asyncio.gather(*(self._finish_close(c, s) for c, s in idle))

    async def close_idle(self) -> None:
        """Close every idle process (their chats' next turns start new ones)."""
        async with self._cond:
            idle = [(c, self._take(c)) for c in list(self._live) if c not in self._busy]
        await asyncio.gather(*(self._finish_close(c, s) for c, s in idle))

    async def close_all(self) -> None:
        entries = list(self._live.items())
        self._live.clear()
        self._started_with.clear()
        await asyncio.gather(*(s.close() for _, (s, _) in entries), return_exceptions=True)
