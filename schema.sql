-- backupmx queue schema: the single source of it.
--
-- `backupmx serve` applies this file on every start, inside one transaction;
-- every statement is CREATE ... IF NOT EXISTS, so running it on an existing
-- queue changes nothing. An older queue is migrated in the same transaction
-- (backupmx/store_db.py): columns added since are added to its tables, and
-- the views this file defines, which hold no data, are dropped so that it
-- creates them as they are now (views of your own are left alone). Only
-- `serve` (and the processes it starts) migrates: the other commands refuse
-- an older queue with "start the server once to migrate the queue".
--
-- Which programs may open a queue (the end of this file): PRAGMA user_version
-- is the schema version of the newest backupmx that opened it, and
-- schema_compat.oldest_version the oldest schema version whose backupmx can
-- still read and write it. A backupmx opens a queue whose version is newer
-- than its own when that oldest_version is not above its own version; it then
-- applies nothing and leaves both marks as they are. So an upgrade's `serve`
-- does not lock out an older server still running, and a rollback to an older
-- release works, as long as the changes between them are additive. Builds
-- from before schema_compat (added in schema 6) refuse any newer
-- user_version: that cannot be changed in copies already deployed.
--
-- Model: a message (envelope sender + body) is stored ONCE in `messages`, its
-- body in consecutive rows of `body_chunks` (since schema 11; before, in
-- messages.body: schema 13's rebuild moved what was left there into chunks).
-- It has one row in `queue` per configured recipient domain it was accepted
-- for (same queue id, the domain names the row), and one row in `recipients`
-- per RCPT TO of that domain. Deliveries are per domain: ETRN for a domain
-- hands over exactly that domain's rows. When its last row goes, the message
-- is listed in `reclaim`, and housekeeping deletes it and its body's chunks
-- within a minute (since schema 14): until then it is in no view and no
-- count, and its disk space comes back with that round's vacuum.
--
-- Clustered by domain (since schema 13): `queue` and `recipients` are WITHOUT
-- ROWID tables keyed domain first, so a domain's rows lie side by side however
-- its mail arrived among the other domains', and a flush that delivers them
-- dirties (and its checkpoints copy back) few pages rather than a page or two
-- per table and message; `messages` is WITHOUT ROWID too (the row is stored in
-- its key's b-tree: one page a message, not two). Before, rows were stored in
-- arrival order, and mail for a hundred domains arriving mixed made a flush at
-- a million queued messages half as fast as into an empty queue
-- (bench/README.md, "The flush at 1M ... clustered by domain"). A queue of an
-- older schema is rebuilt once, at the first `serve` (backupmx/store_db.py:
-- new tables, every row copied in key order, the old ones dropped, all in the
-- one migration transaction); nothing orders by rowid any more.
--
-- A new queue is created with PRAGMA auto_vacuum = INCREMENTAL and PRAGMA
-- page_size = 4096 (set by backupmx/store_db.py before this file runs: neither
-- can be changed once a table exists), so housekeeping can hand the pages of
-- flushed mail back to the file system with PRAGMA incremental_vacuum.
-- Larger pages make every commit write more to the WAL, so each 250 slower
-- (measured with 2 KB messages: 8 KB pages ~8% fewer messages/s, 16 KB ~17%
-- fewer, bench/README.md); the body chunks pack 4 KB pages, so larger ones
-- gain little disk. (Before schema 11 a 2 KB body in its message row took a
-- 4 KB page of its own.) An older queue gets incremental vacuum, and another
-- page size, this way (server stopped):
--   sqlite3 queue.db 'PRAGMA journal_mode = DELETE; PRAGMA page_size = 8192;
--                     PRAGMA auto_vacuum = INCREMENTAL; VACUUM; PRAGMA journal_mode = WAL;'
--
-- What `backupmx queue`, `metrics`, `health`, ETRN's counts and the quotas read
-- must not grow with the queue: queue_totals keeps the rows and bytes per
-- domain and state (triggers keep it, whoever changes a row: backupmx, an older
-- backupmx, the sqlite3 shell), and each queue row carries a copy of its
-- message's size and arrival time, so the summary and the age scans read the
-- queue's index alone. INSERT OR REPLACE / UPDATE OR REPLACE on queue by hand
-- would count a row twice (SQLite fires no delete trigger for the row a REPLACE
-- removes): use plain INSERT, UPDATE and DELETE. Should the totals ever disagree
-- with the queue, stop the server, delete their rows (DELETE FROM queue_totals)
-- and start it: they are counted anew before any worker runs. Only what is shown
-- and the quotas read the totals; whether a domain has mail to flush or expire
-- is asked of the queue itself, so a wrong total never holds mail back.
--
-- All times are unix seconds, UTC (INTEGER). In the sqlite3 shell,
-- datetime(x, 'unixepoch') shows them and unixepoch() is "now" (SQLite 3.38+;
-- older shells: CAST(strftime('%s', 'now') AS INTEGER)).
--
-- Answering questions with `sqlite3 /var/spool/backupmx/queue.db`:
--   SELECT * FROM queue_summary;                          -- per domain: messages, bytes, oldest, last ETRN and delivery
--   SELECT domain, datetime(last_etrn, 'unixepoch') FROM domain_status; -- did the primary poll?
--   SELECT * FROM queue_list WHERE domain = 'example.com'; -- one line per queued message
--   SELECT body FROM message_bodies WHERE queue_id = 'ID';   -- a message as it will be delivered
--   SELECT writefile('ID.eml', body) FROM message_bodies WHERE queue_id = 'ID'; -- ... into a file
--   SELECT domain, state, COUNT(*) FROM queue GROUP BY 1, 2;
--   SELECT * FROM recipients WHERE state = 'failed';      -- what the primary refused, and why
--   SELECT datetime(at, 'unixepoch'), domain, what, detail
--     FROM events WHERE queue_id = 'ID' ORDER BY what <> 'queued', id; -- life of one message that left ...
--   SELECT datetime(at, 'unixepoch'), domain, detail
--     FROM queue_arrivals WHERE queue_id = 'ID'          -- ... and the arrival of one still waiting (events)
--      AND domain IN (SELECT domain FROM message_domains WHERE queue_id = 'ID');
--   SELECT domain FROM message_domains WHERE queue_id = 'ID'; -- the domains a message was queued for
--   SELECT * FROM flushes;                                -- pending ETRNs and running deliveries
-- Changing the queue by hand (what `backupmx hold|release|requeue|delete` do):
--   UPDATE queue SET state = 'held', state_changed = unixepoch()
--     WHERE domain = 'example.com' AND state = 'queued';  -- hold a domain: never flushed
--   UPDATE queue SET state = 'queued', state_changed = unixepoch()
--     WHERE domain = 'example.com' AND state = 'held';    -- release it again
--   DELETE FROM queue WHERE domain = 'example.com' AND queue_id = 'ID'; -- drop a message's row for a domain
--   DELETE FROM queue WHERE queue_id = 'ID'               -- drop a message (all its domains)
--     AND domain IN (SELECT domain FROM message_domains WHERE queue_id = 'ID');
-- (A queue row is found by its domain and queue id: since schema 15 the queue has
-- no index of queue ids alone, and `WHERE queue_id = 'ID'` alone reads every row,
-- seconds at a million messages; table message_domains names a message's domains.)
-- Deleting is safe with or without PRAGMA foreign_keys: the triggers at the
-- end remove a row's recipients, and list the message in `reclaim` once its
-- last row is gone (housekeeping deletes it and its body's chunks then).
-- Prefer the backupmx commands while the server runs: they also log an event.

-- One accepted message: the envelope sender and the body, stored once however
-- many domains it is queued for. A message row lives as long as at least one
-- `queue` row refers to it, and then until housekeeping reclaims it (table
-- reclaim); its body's chunks as long as it (triggers below).
CREATE TABLE IF NOT EXISTS messages (
    queue_id    TEXT PRIMARY KEY NOT NULL, -- id given in "250 2.0.0 Ok: queued as <id>"; [0-9A-Z], roughly time-sortable
    sender      TEXT NOT NULL,             -- MAIL FROM reverse-path without <>; '' is the null sender <> (bounces)
    received_at INTEGER NOT NULL,          -- unix time the message was accepted (the final 250 of DATA)
    size        INTEGER NOT NULL,          -- length of body in bytes
    client      TEXT,                      -- the SMTP client's address, e.g. '192.0.2.7' or '2001:db8::7'; sent as XFORWARD ADDR to a primary that offers it
    helo        TEXT,                      -- the name the client gave in EHLO/HELO; sent as XFORWARD HELO
    envid       TEXT,                      -- RFC 3461 ENVID= from MAIL FROM (xtext as given), NULL if absent
    ret         TEXT,                      -- RFC 3461 RET= ('FULL' or 'HDRS'), NULL if absent
    body_type   TEXT NOT NULL DEFAULT '7BIT', -- RFC 6152 BODY= ('7BIT' or '8BITMIME'), passed on to the primary
    smtputf8    INTEGER NOT NULL DEFAULT 0, -- RFC 6531: 0 = MAIL FROM had no SMTPUTF8; 1 = it had, all ASCII; 2 = it had and the envelope or a header is UTF-8: only a primary offering SMTPUTF8 gets it (else the recipients fail with 5.6.7)
    client_name TEXT,                      -- the client's verified DNS name (its PTR name, confirmed by that name's addresses) or 'unknown'; NULL in mail queued before version 7. Sent as XFORWARD NAME
    protocol    TEXT,                      -- how it came in, as Received: says "with": 'ESMTP', 'ESMTPS', 'ESMTPSA' (RFC 3848), 'UTF8SMTPS' (RFC 6531) ...; sent as XFORWARD PROTO
    first_chunk INTEGER NOT NULL,          -- the body is body_chunks first_chunk .. last_chunk, in id order (none when last_chunk < first_chunk: an empty body)
    last_chunk  INTEGER NOT NULL           -- see first_chunk
) WITHOUT ROWID; -- since schema 13: the row is where its key is (one b-tree, not a table and its key's index)

-- The message bodies, in pieces (not BDAT's chunks): a message's are the ids
-- messages.first_chunk .. last_chunk, written in the transaction that queues
-- it and deleted with it (trigger message_chunks_gone). Each body is exactly
-- as it will be delivered, our Received: header first; CRLF line ends, not
-- dot-stuffed. Pieces of ~500 bytes pack the 4 KB pages (eight a page; a 2 KB
-- body in its own row took a page of its own), and past 4.5 KB a piece fills
-- its overflow pages exactly (up to 64 KB a piece, few rows for a long body):
-- backupmx/store_db.py, chunk_lengths. The view message_bodies puts a body
-- together (the header's examples).
CREATE TABLE IF NOT EXISTS body_chunks (
    id   INTEGER PRIMARY KEY, -- consecutive within one message, in body order
    data BLOB NOT NULL        -- the next bytes of the body
);

-- Messages whose last `queue` row is gone (delivered, deleted, purged, by
-- whoever: trigger queue_gone), waiting for housekeeping to delete them and,
-- with them, their body's chunks (backupmx/lifecycle.py, reclaim; every 30 s,
-- before the incremental vacuum; not while a flush delivers, 5 minutes at
-- most). Since schema 14: deleting a message in the flush's transaction
-- dirtied a page of `messages` and one or two of `body_chunks` per message
-- delivered, where mail for many domains arrived mixed (keyed by arrival, a
-- domain's messages lie among the others');
-- housekeeping deletes them in queue id order, a few hundred a transaction, so
-- after a drain whole pages go at once (bench/README.md, "The flush at 1M with
-- the message's deletion deferred"). Appended in rowid order: a flush's batch
-- writes one page of it. A message waiting here is in no view nor count
-- (they start from `queue`); its events go one expired_retention after it.
-- Left alone by a backupmx of schema 13 (the top of this file, schema_compat):
-- while only such one runs, delivered messages wait here; to reclaim them by hand:
--   DELETE FROM messages WHERE queue_id IN (SELECT queue_id FROM reclaim)
--     AND NOT EXISTS (SELECT 1 FROM message_domains AS d JOIN queue AS q
--                      ON q.domain = d.domain AND q.queue_id = d.queue_id WHERE d.queue_id = messages.queue_id);
--   DELETE FROM reclaim WHERE queue_id NOT IN (SELECT queue_id FROM messages);
CREATE TABLE IF NOT EXISTS reclaim (
    id       INTEGER PRIMARY KEY, -- order of arrival here (a new row goes at the end of the table)
    queue_id TEXT NOT NULL        -- the message (no foreign key: its row goes after the message's)
);

-- One row per (message, recipient domain): the unit that is flushed to the
-- domain's primary. State machine:
--   queued  -> deleted  (the primary accepted every recipient: 2xx)
--   queued  -> held     (operator; a held row is never flushed) -> queued (release)
--   queued  -> failed   (the primary refused every remaining recipient: 5xx; kept expired_retention)
--   queued  -> expired  (older than queue_lifetime, counted from received_at or from the
--                        operator's last release/requeue, whichever is later; kept expired_retention)
--   failed/expired/held -> queued (operator requeue)
-- (Since schema 15 queue_id has no foreign key to messages: message_domains says
-- why. The migration takes the clause out of the line below as it was, so that
-- an older queue's table reads as this one.)
CREATE TABLE IF NOT EXISTS queue (
    queue_id      TEXT NOT NULL, -- the message
    domain        TEXT NOT NULL,                     -- configured recipient domain, lower case, no trailing dot
    state         TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'held', 'failed', 'expired')), -- see the state machine above
    attempts      INTEGER NOT NULL DEFAULT 0,        -- delivery attempts to the primary so far
    last_attempt  INTEGER,                           -- unix time of the last attempt, NULL if none yet
    last_reply    TEXT,                              -- the primary's last reply (or the connection error), NULL if none yet
    next_attempt  INTEGER,                           -- unix time a retry is due (used only when retry_interval is on); NULL = only on ETRN/flush
    state_changed INTEGER NOT NULL,                  -- unix time `state` last changed (expired_retention counts from here; a released or requeued row's queue_lifetime too)
    delay_warned  INTEGER,                           -- unix time the delay warning DSN (delay_warning) was sent or claimed for sending; NULL = none yet. One per row
    message_received_at INTEGER,                     -- messages.received_at of the row's message (a copy: the age scans need no join); filled by trigger queue_copies when NULL
    message_size  INTEGER,                           -- messages.size of the row's message (a copy, counted in queue_totals); filled likewise
    PRIMARY KEY (domain, queue_id)                   -- one row per message and domain; domain first (the header: a domain's rows side by side)
) WITHOUT ROWID;

-- The domains a message was queued for, one row each (since schema 15): how a
-- message's queue rows are found by its queue id alone (the queue's key starts
-- with the domain) -- the triggers queue_gone and messages_gone, housekeeping's
-- reclaim, a flush's body reads, `backupmx show|hold|delete ID`: each domain
-- here, then the queue row by its key (domain, queue_id). A row is added with
-- the queue row (trigger message_domains_added, whoever inserts it) and lives
-- as long as the MESSAGE: deleted with it (trigger messages_gone) by the
-- reclaim, in queue id order, a few hundred at a time, so its pages go whole.
-- Filled from the queue by the migration from schema 14 (1,000,000 rows: 0.9 s).
-- Before, an index queue_message (queue_id) of the queue did this job: its
-- entries went with each queue row, deleted by the flush, and where mail for a
-- hundred domains arrived mixed each entry a flush deleted was on a leaf of its
-- own (time-sortable ids): 0.8 of the 1.6 pages a delivered message wrote at
-- 1,000,000 queued (bench/README.md, "The flush at 1M without queue_message").
-- A row whose queue row is gone means nothing by itself: always join the queue.
-- No foreign key to messages nor from queue (the queue's reference to messages
-- went with schema 15: with foreign_keys on, each message the reclaim deletes
-- would have looked its queue rows up by queue id alone, a scan of the queue).
CREATE TABLE IF NOT EXISTS message_domains (
    queue_id TEXT NOT NULL,   -- the message
    domain   TEXT NOT NULL,   -- a domain it was queued for (a queue row's, now or before)
    PRIMARY KEY (queue_id, domain) -- a message's domains side by side, in queue id order
) WITHOUT ROWID;
-- Since schema 15 (message_domains); a backupmx of schema 14 or 13 does not
-- make it again (it applies nothing to a newer queue: the top of this file).
DROP INDEX IF EXISTS queue_message;

-- The rows of one domain in one state, oldest first: a flush's work list,
-- the oldest waiting message (queue_summary), expiry, the age histogram.
-- (Before schema 10 it was (domain, state) alone.)
CREATE INDEX IF NOT EXISTS queue_domain_state ON queue (domain, state, message_received_at);

-- Retention: failed and expired rows by the time they changed state (few: the index stays small).
CREATE INDEX IF NOT EXISTS queue_kept ON queue (state_changed) WHERE state IN ('failed', 'expired');

-- Delay warnings (delay_warning): the queued rows not warned yet, per domain and
-- oldest first, so each housekeeping round reads only the rows it may warn (one
-- short range per domain). Without it the round read every queued row: 90 ms at
-- 1,000,000 queued, 1.6 s once ANALYZE's statistics made SQLite walk
-- queue_domain_state instead (bench/delay_scan.py). Domain first, like
-- queue_domain_state: a flush deletes one domain's rows, and they sit side by side
-- here too. (queue_delay_due, the same rows by age alone, interleaves the domains
-- whose mail arrives mixed: each row a flush deletes then dirties a leaf page of
-- its own; bench/backlog.py --interleaved.)
-- ~25 bytes a queued row (its domain and arrival time; the database stayed at
-- 1.237x its bodies at 1,000,000 queued). Added within schema 12: additive
-- (built at the first start), and older programs keep it up to date unaware.
CREATE INDEX IF NOT EXISTS queue_unwarned ON queue (domain, message_received_at)
    WHERE state = 'queued' AND delay_warned IS NULL;
DROP INDEX IF EXISTS queue_delay_due;

-- Rows and bytes per domain and state, kept by the triggers queue_totals_*
-- below in the transaction that changes a queue row. A row with messages = 0
-- may stay. What the summary, metrics, health, ETRN and the quotas count.
--   SELECT domain, state, messages, bytes FROM queue_totals WHERE messages > 0;
CREATE TABLE IF NOT EXISTS queue_totals (
    domain   TEXT NOT NULL,              -- configured domain, lower case
    state    TEXT NOT NULL,              -- queued | held | failed | expired
    messages INTEGER NOT NULL DEFAULT 0, -- queue rows of that domain in that state
    bytes    INTEGER NOT NULL DEFAULT 0, -- the sum of their message_size
    PRIMARY KEY (domain, state)          -- one row per domain and state
) WITHOUT ROWID;

-- One row per RCPT TO that is still owed a delivery (or that failed or expired).
-- A recipient the primary accepted (2xx) is deleted; when the last recipient of
-- a queue row goes, the row goes (trigger recipients_gone).
CREATE TABLE IF NOT EXISTS recipients (
    queue_id   TEXT NOT NULL,   -- the message
    position   INTEGER NOT NULL DEFAULT 0, -- its place among the message's RCPT TOs (0 first): delivered, listed and bounced in this order. Since schema 13 (a recipient queued before has its old rowid here: the same order)
    domain     TEXT NOT NULL,   -- the queue row (configured domain) this recipient belongs to
    address    TEXT NOT NULL,   -- forward-path as the client wrote it (source route removed), without <>; sent to the primary unchanged
    notify     TEXT,            -- RFC 3461 NOTIFY= as given (e.g. 'SUCCESS,DELAY', 'NEVER'), NULL if absent
    orcpt      TEXT,            -- RFC 3461 ORCPT= as given (e.g. 'rfc822;user@example.com'), NULL if absent
    state      TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'failed', 'expired')), -- queued: still to deliver; failed: the primary said 5xx; expired: queue_lifetime passed
    last_reply TEXT,            -- the primary's last reply for this recipient, NULL if none yet
    dsn_sent   INTEGER,         -- for failed/expired: unix time the delivery status notification was sent (or skipped: null sender, no bounce_relay); NULL = still due
    dsn_claimed INTEGER,        -- unix time a housekeeper claimed this recipient's DSN for sending (so two never send it twice); a claim older than 10 minutes is void; NULL = not claimed
    PRIMARY KEY (domain, queue_id, address),          -- a duplicate RCPT TO is stored once; domain first, as the queue's
    FOREIGN KEY (queue_id, domain) REFERENCES queue (queue_id, domain) ON DELETE CASCADE -- the queue row
) WITHOUT ROWID;

-- The recipients whose delivery status notification is due (few: the index stays small).
CREATE INDEX IF NOT EXISTS recipients_dsn_due ON recipients (queue_id, domain)
    WHERE state IN ('failed', 'expired') AND dsn_sent IS NULL;

-- Flush (ETRN) requests and the lease of the flusher delivering a domain.
-- One row per domain that was ever flushed. A request made while a delivery
-- runs sets requested_at again, so the domain is flushed once more afterwards.
-- A lease runs out by itself: a flusher that crashed frees the domain at
-- lease_expires, and since it never released the lease, the domain is
-- flushed again then even without a new request. `UPDATE flushes SET requested_at = unixepoch() WHERE domain = 'example.com'`
-- is the same as `backupmx flush example.com`.
CREATE TABLE IF NOT EXISTS flushes (
    domain        TEXT PRIMARY KEY NOT NULL, -- configured domain, lower case
    requested_at  INTEGER,                   -- unix time of the oldest flush request not yet taken by a flusher; NULL = none pending
    lease_owner   TEXT,                      -- flusher (or ATRN session) delivering the domain now (e.g. 'host:pid'), NULL = none
    lease_expires REAL                       -- unix time (may be fractional) the lease ends unless renewed; at or after it the domain is free
);

-- Recipient verification (`recipients = verify`): the primary's answer to a
-- callout (MAIL FROM:<>, RCPT TO:<address>, RSET), per address, shared by
-- every SMTP worker. A fresh row answers RCPT without asking the primary; a
-- stale one (past `expires`) is asked again, and still answers while the
-- primary cannot be reached. 4xx answers are not kept. Housekeeping deletes
-- refused rows once they expire and accepted ones 30 days after.
--   SELECT address, result, reply, datetime(expires, 'unixepoch') FROM verify_cache WHERE domain = 'example.com';
--   DELETE FROM verify_cache WHERE address = 'bob@example.com';  -- ask the primary again (`backupmx verify flush`)
CREATE TABLE IF NOT EXISTS verify_cache (
    address TEXT PRIMARY KEY NOT NULL, -- local@domain as RCPT named it, ASCII letters lower-cased, the configured domain (A-labels)
    domain  TEXT NOT NULL,             -- the configured domain the address belongs to
    result  TEXT NOT NULL CHECK (result IN ('accepted', 'refused')), -- the primary's 2xx / 5xx to RCPT
    reply   TEXT NOT NULL,             -- the primary's reply, as the log shows it (quoted in our 550 when refused)
    checked INTEGER NOT NULL,          -- unix time of the callout
    expires INTEGER NOT NULL           -- unix time the answer goes stale: checked + verify_positive_ttl / verify_negative_ttl
) WITHOUT ROWID;                       -- RCPT's look-up is one search of this table's b-tree

-- `backupmx verify list|flush DOMAIN`.
CREATE INDEX IF NOT EXISTS verify_cache_domain ON verify_cache (domain);

-- Failed AUTH attempts, one row each, so that max_auth_failures_per_client
-- holds across every session, SMTP worker and `serve --inetd` process (the
-- queue is the one place they all share) and outlives a worker's death.
-- A client with max_auth_failures_per_client rows newer than
-- auth_failure_window gets 421 4.7.0 at its next AUTH, before any password
-- is looked at. A success does not remove rows: they age out. Rows older than
-- the window go when the client fails again, and at housekeeping.
--   SELECT client, COUNT(*), datetime(MAX(at), 'unixepoch') FROM auth_failures GROUP BY 1;
--   DELETE FROM auth_failures WHERE client = '192.0.2.7';  -- let a client try again now
CREATE TABLE IF NOT EXISTS auth_failures (
    client TEXT NOT NULL, -- '192.0.2.7', or an IPv6 client's /64: '2001:db8:1:2::/64' (IPv4-mapped addresses as IPv4)
    at     REAL NOT NULL  -- unix time of the failed attempt
);

-- Counting one client's recent failures.
CREATE INDEX IF NOT EXISTS auth_failures_client ON auth_failures (client, at);

-- Greylisting (`greylist = DURATION`): one row per (client network, sender,
-- recipient) seen at RCPT. The first attempt gets 450 4.7.1; a retry after
-- `greylist` and within `greylist_expire` passes, and the triple then passes
-- at once for 35 days after it was last seen. Housekeeping deletes waiting
-- rows older than greylist_expire and passed ones unseen for 35 days; no
-- network has more than 1000 waiting rows (beyond, new triples get 450 and no
-- row), so a client rotating senders cannot grow the table without bound.
--   SELECT client, COUNT(*) FROM greylist WHERE passed IS NULL GROUP BY 1 ORDER BY 2 DESC LIMIT 10;  -- churn
--   DELETE FROM greylist WHERE client = '192.0.2.0/24';  -- greylist a network afresh
CREATE TABLE IF NOT EXISTS greylist (
    client     TEXT NOT NULL,    -- the client's network: '192.0.2.0/24', or '2001:db8:1:2::/64' for IPv6
    sender     TEXT NOT NULL,    -- MAIL FROM, lower-cased, digit runs in its local part as '#' and BATV/SRS tags dropped (they change with each retry); '' = <>
    recipient  TEXT NOT NULL,    -- RCPT TO, lower-cased
    first_seen INTEGER NOT NULL, -- unix time of the first attempt: the delay counts from here
    passed     INTEGER,          -- unix time of the retry that passed; NULL = still waiting
    last_seen  INTEGER NOT NULL, -- unix time last seen (refreshed at most daily once passed); first_seen while waiting
    PRIMARY KEY (client, sender, recipient) -- one row per triple
) WITHOUT ROWID;

-- Housekeeping's purge, oldest first.
CREATE INDEX IF NOT EXISTS greylist_last_seen ON greylist (last_seen);

-- The waiting rows of one network (its bound).
CREATE INDEX IF NOT EXISTS greylist_waiting ON greylist (client) WHERE passed IS NULL;

-- Monitoring mode (`accept_when = primary-unreachable`): what the last probe
-- of each such domain's primary found, shared by every SMTP worker. While
-- `up` is 1 (and the probe is recent), RCPT for the domain gets 450 4.4.0
-- "the primary MX is up; deliver there". The flush workers probe every
-- primary_probe_interval; `probing_until` lets only one process probe at a time.
--   SELECT domain, up, reply, datetime(checked_at, 'unixepoch'), datetime(changed_at, 'unixepoch') FROM primary_status;
CREATE TABLE IF NOT EXISTS primary_status (
    domain        TEXT PRIMARY KEY NOT NULL, -- a configured domain with accept_when = primary-unreachable
    up            INTEGER,                   -- 1: its primary greeted with 220 at the last probe; 0: it did not; NULL: not probed yet
    reply         TEXT,                      -- the primary's greeting, or why the probe failed
    checked_at    INTEGER,                   -- unix time of the last probe
    changed_at    INTEGER,                   -- unix time `up` last changed
    probing_until REAL                       -- a process took the next probe until then (NULL: nobody); one probe per interval across processes
);

-- History: one row per thing that happened to a message, kept after the
-- message is delivered (until expired_retention), so nothing leaves without a trace.
-- A row's arrival (`queued`) is written when the row leaves the queue (trigger
-- queue_history), not when it is accepted: a queued row's own columns say it
-- (view queue_arrivals), and a backlog of a million messages does not keep a
-- million copies of their envelopes here (since schema 12; before, the accept
-- wrote it, and such rows keep theirs). So the `queued` row comes after the
-- others in id order: `backupmx show` lists it first.
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY, -- order of events (but `queued`, see above)
    at       INTEGER NOT NULL,    -- unix time (`queued`: the message's received_at)
    queue_id TEXT NOT NULL,       -- the message (no foreign key: events outlive it)
    domain   TEXT,                -- the queue row concerned, NULL for the message as a whole
    what     TEXT NOT NULL,       -- queued | delivered | deferred | failed | expired | held | released | requeued | deleted | dsn | dsn-failed | delay-warning
    detail   TEXT                 -- recipients and reply, free text
);

-- Looking up the history of one message.
CREATE INDEX IF NOT EXISTS events_queue_id ON events (queue_id);

-- Retention: the history older than expired_retention.
CREATE INDEX IF NOT EXISTS events_at ON events (at);

-- Per domain: what the primary did last, and since when mail waits for it.
-- The alarm a backup MX needs most is "the primary forgot to poll": mail
-- waiting (queueing_since) and no recent last_etrn. One row per domain that
-- ever had mail or an ETRN; `backupmx queue`, `metrics` and `health` read it.
CREATE TABLE IF NOT EXISTS domain_status (
    domain            TEXT PRIMARY KEY NOT NULL, -- configured domain, lower case
    last_etrn         INTEGER, -- unix time of the last ETRN naming it (authenticated, over SMTP; not `backupmx flush`), NULL = never
    last_delivery     INTEGER, -- unix time the primary last accepted (2xx) mail of it, NULL = never
    queueing_since    INTEGER, -- unix time mail started waiting (queued or held) after the domain was empty; NULL = nothing waits.
                               -- Set in the transaction that queues the first message, cleared once the domain is empty again
                               -- (logged as domain-queueing / domain-drained, each once)
    notified_queueing INTEGER, -- unix time the domain's `notify` address was told that it started queueing; NULL = not (yet) for this queueing_since
    notified_age      INTEGER  -- unix time the `notify` address was told its oldest mail passed notify_age; NULL = not (yet)
);

-- Counters that outlive the processes (the metrics' *_total): events that
-- happen too often for an `events` row each. A row per (name, label).
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT NOT NULL,           -- messages_received | messages_delivered | rejects
    label TEXT NOT NULL DEFAULT '', -- rejects: the reason (the reply's name in backupmx/replies.py, lower case); else ''
    value INTEGER NOT NULL DEFAULT 0, -- how many since the queue was created
    PRIMARY KEY (name, label)      -- one row per counter and label
);

-- Per domain: what is waiting (queued or held), and when the primary last
-- polled and took mail. A domain with nothing waiting has no row. bytes
-- counts a message once per domain it is queued for.
-- (Counted from queue_totals, and the oldest found at the start of each state's
-- range of queue_domain_state: a few index searches per domain, whatever the queue holds.)
CREATE VIEW IF NOT EXISTS queue_summary (domain, messages, bytes, oldest, last_etrn, last_delivery) AS
    SELECT w.domain, w.messages, w.bytes,
           MIN(COALESCE(w.queued, w.held), COALESCE(w.held, w.queued)), -- oldest: unix time (integer)
           s.last_etrn, s.last_delivery                                 -- unix times, NULL = never
    FROM (SELECT t.domain, SUM(t.messages) AS messages, SUM(t.bytes) AS bytes,
                 (SELECT MIN(q.message_received_at) FROM queue AS q
                   WHERE q.domain = t.domain AND q.state = 'queued') AS queued,
                 (SELECT MIN(q.message_received_at) FROM queue AS q
                   WHERE q.domain = t.domain AND q.state = 'held') AS held
          FROM queue_totals AS t
          WHERE t.state IN ('queued', 'held')
          GROUP BY t.domain
          HAVING SUM(t.messages) > 0) AS w
    LEFT JOIN domain_status AS s USING (domain);

-- A message's body put together (queue_id, body) from its chunks
-- (group_concat takes the chunks in the order the id range is read: id order).
--   SELECT writefile('ID.eml', body) FROM message_bodies WHERE queue_id = 'ID';
-- A message waiting in `reclaim` (no queue row left) is not shown.
CREATE VIEW IF NOT EXISTS message_bodies (queue_id, body) AS
    SELECT m.queue_id, CAST(COALESCE((SELECT group_concat(c.data, '') FROM body_chunks AS c
                                       WHERE c.id BETWEEN m.first_chunk AND m.last_chunk), '') AS BLOB)
    FROM messages AS m WHERE EXISTS (SELECT 1 FROM message_domains AS d JOIN queue AS q
                                      ON q.domain = d.domain AND q.queue_id = d.queue_id
                                      WHERE d.queue_id = m.queue_id);

-- A queue row's arrival as its `queued` event says it (the history, schema.sql's
-- events): what trigger queue_history writes when the row leaves, and what
-- `backupmx show` lists while it waits. `to` names the recipients still waiting
-- (the ones delivered are in their `delivered` events).
--   SELECT datetime(at, 'unixepoch'), domain, detail FROM queue_arrivals
--    WHERE queue_id = 'ID' AND domain IN (SELECT domain FROM message_domains WHERE queue_id = 'ID');
CREATE VIEW IF NOT EXISTS queue_arrivals (queue_id, domain, at, detail) AS
    SELECT q.queue_id, q.domain, COALESCE(q.message_received_at, m.received_at),
           'from=<' || COALESCE(m.sender, '?') || '>'
           || COALESCE(' to=' || (SELECT group_concat(a, ',') FROM
                                   (SELECT '<' || r.address || '>' AS a FROM recipients AS r
                                     WHERE r.domain = q.domain AND r.queue_id = q.queue_id ORDER BY r.position)), '')
           || ' size=' || COALESCE(q.message_size, m.size) || ' client=' || COALESCE(m.client, '-')
    FROM queue AS q LEFT JOIN messages AS m USING (queue_id);

-- One line per queue row (any state), recipients comma-separated, oldest first.
CREATE VIEW IF NOT EXISTS queue_list
    (queue_id, domain, state, received_at, size, sender, recipients, attempts, last_reply) AS
    SELECT q.queue_id, q.domain, q.state, m.received_at, m.size, m.sender,
           (SELECT group_concat(a, ',') FROM (SELECT r.address AS a FROM recipients AS r
             WHERE r.domain = q.domain AND r.queue_id = q.queue_id ORDER BY r.position)),
           q.attempts, q.last_reply
    FROM queue AS q JOIN messages AS m USING (queue_id)
    ORDER BY m.received_at, q.queue_id, q.domain;

-- The last recipient of a row is gone (delivered or deleted): the row goes.
CREATE TRIGGER IF NOT EXISTS recipients_gone AFTER DELETE ON recipients
WHEN NOT EXISTS (SELECT 1 FROM recipients WHERE queue_id = OLD.queue_id AND domain = OLD.domain)
BEGIN
    DELETE FROM queue WHERE queue_id = OLD.queue_id AND domain = OLD.domain;
END;

-- A row is gone: its recipients go (also when foreign_keys is off, as in the
-- sqlite3 shell), and once no other domain's row refers to the message, it is
-- put in `reclaim` for housekeeping to delete (since schema 14; before, it was
-- deleted here, in the flush's own transaction). The other rows are looked for
-- through message_domains, by the queue's key: read, nothing written (since
-- schema 15; the row's message_domains entry stays until the message goes).
CREATE TRIGGER IF NOT EXISTS queue_gone AFTER DELETE ON queue
BEGIN
    DELETE FROM recipients WHERE queue_id = OLD.queue_id AND domain = OLD.domain;
    INSERT INTO reclaim (queue_id) SELECT OLD.queue_id
        WHERE NOT EXISTS (SELECT 1 FROM message_domains AS d JOIN queue AS q
                           ON q.domain = d.domain AND q.queue_id = d.queue_id
                           WHERE d.queue_id = OLD.queue_id);
END;

-- A queue row is added (by whoever: the intake, an older backupmx, by hand):
-- its message names its domain (message_domains). The same append at the right
-- edge of a b-tree, for new mail, as the index entry it replaced.
CREATE TRIGGER IF NOT EXISTS message_domains_added AFTER INSERT ON queue
BEGIN
    INSERT OR IGNORE INTO message_domains (queue_id, domain) VALUES (NEW.queue_id, NEW.domain);
END;

-- ... or moved to another domain or message by hand: the new one is named too
-- (else the reclaim would not see the row, and delete the message under it).
CREATE TRIGGER IF NOT EXISTS message_domains_moved AFTER UPDATE OF queue_id, domain ON queue
WHEN OLD.queue_id IS NOT NEW.queue_id OR OLD.domain IS NOT NEW.domain
BEGIN
    INSERT OR IGNORE INTO message_domains (queue_id, domain) VALUES (NEW.queue_id, NEW.domain);
END;

-- A message's name goes only once its queue row is gone (messages_gone deletes
-- the rows first): a row without one is invisible to the reclaim, which would
-- delete the message under it once its other rows went -- mail lost. So a hand
-- DELETE or UPDATE of message_domains that would leave a waiting row unnamed
-- fails, whole (`backupmx check` counts such rows, should one be left anyway).
CREATE TRIGGER IF NOT EXISTS message_domains_kept BEFORE DELETE ON message_domains
WHEN EXISTS (SELECT 1 FROM queue WHERE domain = OLD.domain AND queue_id = OLD.queue_id)
BEGIN
    SELECT RAISE(ABORT, 'message_domains: its queue row waits (the reclaim would delete its message)');
END;
-- ... nor moved to another message or domain.
CREATE TRIGGER IF NOT EXISTS message_domains_kept_renamed BEFORE UPDATE OF queue_id, domain ON message_domains
WHEN (OLD.queue_id IS NOT NEW.queue_id OR OLD.domain IS NOT NEW.domain)
 AND EXISTS (SELECT 1 FROM queue WHERE domain = OLD.domain AND queue_id = OLD.queue_id)
BEGIN
    SELECT RAISE(ABORT, 'message_domains: its queue row waits (the reclaim would delete its message)');
END;

-- A message is deleted (by the reclaim, or by hand): its rows go with it (also
-- when foreign_keys is off), then its message_domains rows (in this order: the
-- first reads them).
CREATE TRIGGER IF NOT EXISTS messages_gone AFTER DELETE ON messages
BEGIN
    DELETE FROM queue WHERE domain IN (SELECT domain FROM message_domains WHERE queue_id = OLD.queue_id)
                        AND queue_id = OLD.queue_id;
    DELETE FROM message_domains WHERE queue_id = OLD.queue_id;
END;

-- A message is gone: its body's chunks go (whoever deleted it: housekeeping's
-- reclaim, or the operator by hand).
CREATE TRIGGER IF NOT EXISTS message_chunks_gone AFTER DELETE ON messages
BEGIN
    DELETE FROM body_chunks WHERE id BETWEEN OLD.first_chunk AND OLD.last_chunk;
END;

-- A row leaves the queue (delivered, deleted, purged, by whoever): its arrival
-- goes into the history (schema.sql's events), unless it is there already (a
-- row queued before schema 12). BEFORE: its recipients and message are still
-- there to say it (but the recipients a delivery took: they left with their
-- `delivered` event).
CREATE TRIGGER IF NOT EXISTS queue_history BEFORE DELETE ON queue
WHEN NOT EXISTS (SELECT 1 FROM events WHERE queue_id = OLD.queue_id AND domain = OLD.domain AND what = 'queued')
BEGIN
    INSERT INTO events (at, queue_id, domain, what, detail)
        SELECT at, queue_id, domain, 'queued', detail FROM queue_arrivals
         WHERE queue_id = OLD.queue_id AND domain = OLD.domain;
END;

-- queue_totals follows every queue row (whoever writes it): a new row counts ...
CREATE TRIGGER IF NOT EXISTS queue_totals_insert AFTER INSERT ON queue WHEN NEW.message_size IS NOT NULL
BEGIN
    INSERT INTO queue_totals (domain, state, messages, bytes) VALUES (NEW.domain, NEW.state, 1, NEW.message_size)
        ON CONFLICT (domain, state) DO UPDATE SET messages = messages + 1, bytes = bytes + excluded.bytes;
END;

-- ... also one written without its copies of the message's size and arrival
-- time (by a backupmx older than schema 10, or by hand): they are filled in and
-- it counts here (the fill is no "change" for queue_totals_update, so however
-- SQLite orders the triggers, the row counts once) ...
CREATE TRIGGER IF NOT EXISTS queue_copies AFTER INSERT ON queue WHEN NEW.message_size IS NULL
BEGIN
    UPDATE queue SET message_size = (SELECT size FROM messages WHERE queue_id = NEW.queue_id),
                     message_received_at = (SELECT received_at FROM messages WHERE queue_id = NEW.queue_id)
     WHERE domain = NEW.domain AND queue_id = NEW.queue_id;
    INSERT INTO queue_totals (domain, state, messages, bytes)
        VALUES (NEW.domain, NEW.state, 1, COALESCE((SELECT size FROM messages WHERE queue_id = NEW.queue_id), 0))
        ON CONFLICT (domain, state) DO UPDATE SET messages = messages + 1, bytes = bytes + excluded.bytes;
END;

-- ... a deleted one no longer does ...
CREATE TRIGGER IF NOT EXISTS queue_totals_delete AFTER DELETE ON queue
BEGIN
    UPDATE queue_totals SET messages = messages - 1, bytes = bytes - COALESCE(OLD.message_size, 0)
     WHERE domain = OLD.domain AND state = OLD.state;
END;

-- ... and one that changes domain or state (or size, by hand) moves.
CREATE TRIGGER IF NOT EXISTS queue_totals_update AFTER UPDATE OF domain, state, message_size ON queue
WHEN OLD.domain IS NOT NEW.domain OR OLD.state IS NOT NEW.state
     OR (OLD.message_size IS NOT NULL AND OLD.message_size IS NOT NEW.message_size)
BEGIN
    UPDATE queue_totals SET messages = messages - 1, bytes = bytes - COALESCE(OLD.message_size, 0)
     WHERE domain = OLD.domain AND state = OLD.state;
    INSERT INTO queue_totals (domain, state, messages, bytes)
        VALUES (NEW.domain, NEW.state, 1, COALESCE(NEW.message_size, 0))
        ON CONFLICT (domain, state) DO UPDATE SET messages = messages + 1, bytes = bytes + excluded.bytes;
END;

-- queue_totals counted from the queue when it has no rows: a queue from
-- before schema 10, or the operator emptied it (server stopped) to have it
-- counted anew. This runs at every open: the one-row "empty" side is the outer
-- loop of the CROSS JOIN (SQLite keeps its order), so with totals present the
-- queue is never read (a WHERE NOT EXISTS on the queue's scan was tested per row).
INSERT INTO queue_totals (domain, state, messages, bytes)
    SELECT q.domain, q.state, COUNT(*), COALESCE(SUM(q.message_size), 0)
      FROM (SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM queue_totals)) AS empty
      CROSS JOIN queue AS q
     GROUP BY q.domain, q.state;

-- Which backupmx programs may open this queue (see the top of this file).
-- One row, written by the newest backupmx that opened the queue.
CREATE TABLE IF NOT EXISTS schema_compat (
    id             INTEGER PRIMARY KEY NOT NULL CHECK (id = 1), -- one row
    oldest_version INTEGER NOT NULL -- the oldest schema version (user_version) whose backupmx reads and writes this queue correctly
);

-- Schema version; bump it with a migration in backupmx/store_db.py.
-- 2: queue.delay_warned, recipients.dsn_claimed (added to a version 1 queue on start).
-- 3: messages.smtputf8 (added to an older queue on start).
-- 4: domain_status, counters; queue_summary gains last_etrn and last_delivery.
-- 5: verify_cache (a new table: CREATE TABLE IF NOT EXISTS adds it to an older queue).
-- 6: auth_failures (a new table, likewise); schema_compat.
-- 7: messages.client_name, messages.protocol (added to an older queue on start, after body:
--    reading them then walks the body's pages, as for smtputf8).
-- 8: greylist (a new table, likewise).
-- 9: primary_status (a new table, likewise).
-- 10: queue.message_received_at, queue.message_size (added to an older queue on start and
--    copied from messages), queue_totals and its triggers, queue_domain_state with the
--    arrival time (made anew), queue_kept, recipients_dsn_due, events_at; queue_summary
--    reads queue_totals.
-- 11: body_chunks, messages.first_chunk and last_chunk (added to an older queue on start:
--    its messages keep their bodies in messages.body, nothing is copied), message_bodies,
--    trigger message_chunks_gone; oldest_version 11.
-- 12: the accept writes no `queued` event: trigger queue_history writes it when the row
--    leaves, from view queue_arrivals (a queue that an older backupmx still writes to
--    keeps its `queued` events, and gets none twice); oldest_version stays 11.
-- 13: queue, recipients and messages WITHOUT ROWID, queue and recipients keyed domain
--    first, index queue_message, recipients.position (the RCPT order, which rowid
--    gave), messages.body gone (a body still in it moved into body_chunks); an older
--    queue is rebuilt at its first `serve`; oldest_version 13.
-- 14: reclaim; trigger queue_gone lists a message whose last row went there instead of
--    deleting it (housekeeping does, in queue id order); view message_bodies leaves
--    such messages out (the trigger is replaced at the first `serve`); oldest_version stays 13.
-- 15: message_domains and its triggers; index queue_message and the queue's foreign key
--    to messages gone; queue_gone and messages_gone (and view message_bodies) find a
--    message's rows through message_domains (replaced, and message_domains filled from
--    the queue, at the first `serve`); oldest_version stays 13.
PRAGMA user_version = 15;

-- The oldest schema version whose backupmx can still read and write a queue of
-- this version. When you bump user_version:
--   - keep it for an additive change: a new table, index or view, a new column
--     that is NULL or has a DEFAULT (an older program leaves it alone: the
--     code never uses SELECT * nor INSERT without a column list), a new
--     trigger an older program's writes do not break;
--   - raise it to the new version for anything an older program would misread
--     or break: a renamed or dropped column or table, a new state value, a
--     column the program must fill, a changed meaning.
-- 4: a backupmx of schema 4 or later keeps every table it knows of this one up
-- to date (3 and older know neither domain_status nor counters); one that does
-- not know verify_cache, auth_failures, greylist or primary_status just lacks
-- those features, and one that does not know messages.client_name and
-- protocol leaves them NULL. One that does not know queue_totals or the
-- queue's copies of size and arrival time writes queue rows without them: the
-- triggers fill and count them.
-- 11: a backupmx of schema 10 or older reads every body from messages.body, and
-- the messages queued since are in body_chunks (their body column holds 0: a
-- process of schema 10 still running fails to read one rather than deliver it
-- empty; it never deletes one undelivered).
-- 12 keeps 11: a backupmx of schema 11 still writes a `queued` event at the accept
-- (queue_history then writes none), and its `show` of a waiting message lists the
-- events of those it queued itself.
-- 13: a backupmx of schema 12 or older orders a domain's mail and a message's
-- recipients by rowid, which these tables no longer have, writes messages.body,
-- which is gone, and reads a body queued before schema 11 from it: it must not
-- open the queue (README, "Upgrading": a rollback past schema 13 needs an empty
-- queue, or the old release on a new queue file).
-- 14 keeps 13: the trigger that lists a message in `reclaim` is in the file, so a
-- backupmx of schema 13 delivering and deleting mail fires it too, and nothing it
-- reads or writes changed meaning for it (its views and counts start from `queue`;
-- its `show ID` of a message waiting there prints the message with no domain row),
-- but one: its flush reads a body by the message alone, so a message the operator
-- deletes while that flush has announced it is still sent (one of 14 checks that a
-- queue row refers to it: store_db.STILL_QUEUED). Delivered, not lost.
-- It does not reclaim: while only such a release runs, delivered messages and
-- their bodies stay (disk, not mail: reclaim's comment has the statements to
-- delete them by hand), and the next start of a schema 14 backupmx's housekeeping
-- deletes them. Raising it would lock a rollback out of a queue holding mail
-- for a cost that the next upgrade undoes.
-- 15 keeps 13: nothing a backupmx of schema 13 or 14 reads or writes changed
-- meaning, and it cannot delete a message one of whose rows still waits. Its
-- inserts fire message_domains_added, its deletes our queue_gone and
-- messages_gone (it applies nothing to a newer queue, so the triggers are
-- these); schema 14's reclaim deletes a message only when no queue row has its
-- queue id (NOT EXISTS on the queue itself: true or not, whatever the index),
-- and schema 13 deletes none. What it loses is speed: without queue_message, its
-- look-ups by queue id alone (14's reclaim and body reads, `show|hold|delete ID`)
-- read the whole queue, each, and at a large queue the reclaim would hold the
-- write lock for seconds. Before starting such a release on a large queue, make
-- the index again (README, "Upgrading"; schema 15's next start drops it):
--   sqlite3 queue.db 'CREATE INDEX IF NOT EXISTS queue_message ON queue (queue_id)'
-- The queue's foreign key to messages is gone for it too: it inserts the
-- message before its rows, and messages_gone deletes them with it.
INSERT OR REPLACE INTO schema_compat (id, oldest_version) VALUES (1, 13);
