// pg_sales live dashboard: plain JavaScript, no dependencies, works offline.
//
// REST (/api/v2) for the initial state, one WebSocket (/ws?token=JWT) for live
// events (one `all-stores` subscription follows the whole chain). Sales events
// refetch the summaries and the region x month / year-over-year analytics
// (debounced); store events patch the store list (a store's name or region
// changing, or a store removed, refetches the figures too); a truncated table,
// `resync_required`, a reconnect and a change of access (4012) reload
// everything the page shows from the API; export-progress events drive the
// export progress bar. When the socket drops, the page shows that it is
// reconnecting, reconnects with exponential backoff, re-subscribes and
// resumes from the last event id it saw. Logging out clears every figure of
// the session, so the next user never sees the previous one's.
// Sessions: a short access token and a rotating refresh token; the page
// refreshes before the access token expires, after a 401 (once) and when the
// socket is closed because the user's access changed (4012), and once after
// a socket that failed to open (its upgrade may have been refused). The
// refresh cookie is the browser's, shared by every tab: refreshes take turns
// across tabs (Web Locks) and hand the new token to the other tabs of the
// same session (BroadcastChannel); a refresh answering another user (who
// signed in in another tab) is not adopted; "Log out" ends the tab's own
// session by its access token (refreshing once under the lock if that token
// is refused); a login takes the refresh lock too. Failed loads (summaries,
// analytics, stores) are shown; network failures, 5xx and 429 are tried
// again, other answers (400, 403, 404, 422) are final. Names are isolated (<bdi>) so a direction
// control in one cannot reorder the rest of its line. Admins get a users
// panel (list, add, disable, delete), kept current by the `admin` channel.
'use strict';

(() => {
  const SESSION_KEY = 'pg_sales.session';
  const FEED_MAX = 100;
  const SEEN_MAX = 2000;
  const REFRESH_DEBOUNCE_MS = 250;
  const REFRESH_MAX_WAIT_MS = 2000;
  const PING_EVERY_MS = 20000;
  const SILENCE_LIMIT_MS = 50000;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  // Retries of a failed load (summaries, analytics, the store list).
  const RETRY_BASE_MS = 1000;
  const RETRY_MAX_MS = 30000;
  // The longest a request under the refresh lock (a login, a refresh) may
  // take: a request that never answers must not hold the lock for ever.
  const LOCKED_REQUEST_MS = 15000;
  // Every tab of this origin shares the refresh cookie: one refresh at a
  // time across them (Web Locks), and each new access token is told to the
  // other tabs of the same session (BroadcastChannel).
  const REFRESH_LOCK = 'pg_sales_refresh';
  const SESSION_CHANNEL = 'pg_sales.session';
  const OTHER_USER_MSG = 'You signed in as another user in another tab; sign in again.';
  const ENDED_MSG = 'Your session has ended; please sign in again.';

  const $ = (id) => document.getElementById(id);
  const svgNS = 'http://www.w3.org/2000/svg';

  const state = {
    token: null,
    user: null,
    // The session's refresh token lives in an HttpOnly cookie the page's
    // scripts cannot read (login with refreshCookie); refreshToken is set
    // only for a session that was handed one in a body.
    refreshToken: null,
    cookieSession: false,
    sessionId: null, // the session (refresh-token family) the token belongs to
    // Moves with every login and logout: a refresh that fails after a new
    // session began must not end the new one.
    sessionGen: 0,
    tokenExpiresAt: 0,
    tokenTimer: null,
    refreshing: null,
    users: [],
    usersTimer: null,
    month: currentMonth(),
    topN: 20,
    stores: new Map(), // id -> store document
    byStore: null, // summary rows (groupBy=store); null until loaded
    byRegion: null, // summary rows (groupBy=region); null until loaded
    summaryError: null, // why the summaries could not be loaded
    summaryRetry: null, // timer of the next try after a failed load
    summaryFailures: 0,
    analyticsRetry: null,
    analyticsFailures: 0,
    storesRetry: null,
    storesFailures: 0,
    storesSeq: 0, // the latest store-list load (loadStoresAndSubscribe)
    salesVersions: new Map(), // monthly_sales id -> highest version seen
    lastEventId: null,
    epoch: null, // the event log's epoch lastEventId was read under
    readyLast: null, // the latest `ready`: where this connection starts
    readyEpoch: null,
    seen: new Set(),
    seenOrder: [],
    ws: null,
    wsSubs: new Set(),
    attempt: 0,
    everConnected: false,
    reconnectTimer: null,
    reconnectAt: 0,
    countdownTimer: null,
    pingTimer: null,
    lastMessageAt: 0,
    lastTickAt: 0, // when the heartbeat timer last ran
    silentMs: 0, // silence counted by the heartbeat (see silenceAfterTick)
    wsRefreshTried: false, // a refresh after a failed connect, once per streak
    refreshTimer: null,
    refreshFirstAt: 0,
    refreshFlash: new Set(),
    summarySeq: 0,
    analyticsSeq: 0, // region x month and year-over-year (loadAnalytics)
    analyticsTimer: null,
    exportJob: null,
    exportProgressEvents: 0,
  };

  // ---------- formatting ----------

  const nf0 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const nf2 = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const compact = new Intl.NumberFormat(undefined, { notation: 'compact', maximumFractionDigits: 1 });

  function currentMonth() {
    const d = new Date();
    return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}`;
  }

  function monthLabel(ym) {
    const [y, m] = ym.split('-').map(Number);
    if (!y || !m) return ym;
    return new Date(y, m - 1, 1).toLocaleString(undefined, { month: 'long', year: 'numeric' });
  }

  function num(v) {
    const n = typeof v === 'number' ? v : Number(v);
    return Number.isFinite(n) ? n : 0;
  }

  // A name (store, region, code) as the page shows it in a line of text:
  // isolated, so a direction control in it (say U+202E, right-to-left
  // override) cannot reorder the rest of the line.
  function bdi(text) {
    const b = document.createElement('bdi');
    b.textContent = String(text ?? '');
    return b;
  }

  // "Name (CODE)" as nodes for a line of text.
  function nameParts(name, code) {
    return code === undefined || code === null || code === ''
      ? [bdi(name)]
      : [bdi(name), ' (', bdi(code), ')'];
  }

  function storeParts(id) {
    const s = state.stores.get(Number(id));
    return s ? nameParts(s.name, s.code) : [`store ${id}`];
  }

  // For a string shown on its own (a tooltip): the name between first
  // strong isolate and pop directional isolate, its own isolate controls
  // removed so that none can end the isolate early.
  function isolated(text) {
    return `\u2068${String(text ?? '').replace(/[\u2066-\u2069]/g, '')}\u2069`;
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      // Through the CSSOM: the page's CSP allows no inline style attribute.
      else if (k === 'style') Object.assign(e.style, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  const segmenter = typeof Intl !== 'undefined' && Intl.Segmenter
    ? new Intl.Segmenter(undefined, { granularity: 'grapheme' })
    : null;
  // The user-perceived characters of `text` (code points where the
  // browser has no segmenter).
  function graphemes(text) {
    return segmenter ? Array.from(segmenter.segment(text), (g) => g.segment) : Array.from(text);
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---------- REST ----------

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  async function errorMessage(res) {
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON */ }
    return `${res.status} ${res.statusText || 'error'}`;
  }

  async function api(path, options = {}) {
    const headers = { Accept: 'application/json', ...(options.headers || {}) };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    // no-cache: revalidate with the ETag (304) instead of trusting max-age.
    const res = await fetch(path, { cache: 'no-cache', ...options, headers });
    if (res.status === 401 && state.token && !options.noLogout) {
      if (canRefresh() && !options.retried) {
        // The access token expired or was revoked: one refresh, one retry.
        try {
          await refreshSession();
        } catch (e) {
          // A refresh the server could not answer (network, timeout, 5xx,
          // 429) is tried again later like any such failure; a refused one
          // has signed the tab out.
          if (e && typeof e.status === 'number' && (e.status === 0 || (e.status >= 400 && e.status < 500 && e.status !== 429))) {
            throw new ApiError('unauthorized', 401);
          }
          throw e;
        }
        return api(path, { ...options, retried: true });
      }
      logout('Your session has ended; please sign in again.');
      throw new ApiError('unauthorized', 401);
    }
    if (!res.ok) {
      const err = new ApiError(await errorMessage(res), res.status);
      const ra = (res.headers.get('Retry-After') || '').trim();
      if (/^\d+$/.test(ra)) err.retryAfter = Number(ra);
      throw err;
    }
    return options.raw ? res : res.json();
  }

  // ---------- session ----------

  function saveSession() {
    try {
      sessionStorage.setItem(SESSION_KEY, JSON.stringify({
        token: state.token,
        cookieSession: state.cookieSession,
        sessionId: state.sessionId,
        tokenExpiresAt: state.tokenExpiresAt,
        user: state.user,
      }));
    } catch (_) { /* storage disabled: keep it in memory only */ }
  }

  // A login, refresh or password change answer: the new token pair.
  function adoptSession(body) {
    state.token = body.token;
    state.refreshToken = body.refreshToken || null;
    state.cookieSession = !body.refreshToken;
    state.tokenExpiresAt = Date.now() + (Number(body.expiresIn) || 900) * 1000;
    state.sessionId = body.sessionId || null;
    state.user = body.user;
    saveSession();
    scheduleTokenRefresh();
  }

  // Tells the other tabs of this origin the access token a refresh gave:
  // those of the same user and session take it rather than refresh again.
  const channel = typeof BroadcastChannel === 'function' ? new BroadcastChannel(SESSION_CHANNEL) : null;

  function announceToken() {
    if (!channel || !state.user || !state.sessionId) return;
    channel.postMessage({
      type: 'refreshed',
      userId: state.user.id,
      sessionId: state.sessionId,
      token: state.token,
      tokenExpiresAt: state.tokenExpiresAt,
      user: state.user,
    });
  }

  function tokenAnnounced(m) {
    if (!m || m.type !== 'refreshed' || !state.token || !state.cookieSession || !state.user) return;
    if (m.userId !== state.user.id || !m.sessionId || m.sessionId !== state.sessionId) return;
    if (typeof m.token !== 'string' || !(Number(m.tokenExpiresAt) > state.tokenExpiresAt)) return;
    state.token = m.token;
    state.tokenExpiresAt = Number(m.tokenExpiresAt);
    if (m.user && m.user.id === state.user.id) state.user = m.user;
    saveSession();
    scheduleTokenRefresh();
    showUser();
  }

  // Runs `fn` holding the origin-wide refresh lock, so that two tabs never
  // present the same refresh cookie at once (that counts as a copied token
  // and revokes the session). Without Web Locks (an insecure context) it
  // runs at once.
  function withRefreshLock(fn) {
    if (navigator.locks && typeof navigator.locks.request === 'function') {
      return navigator.locks.request(REFRESH_LOCK, fn);
    }
    return fn();
  }

  // What a refused refresh tells the user: the server's reason, but not the
  // developer's text of a request with no cookie at all (another tab's
  // logout removed it).
  function refreshRefusedMessage(status, msg) {
    if (status === 400 || status === 401 && /^unknown refresh token/i.test(msg)) return ENDED_MSG;
    return `Your session has ended (${msg}); please sign in again.`;
  }

  // Refreshes a minute before the access token expires.
  function scheduleTokenRefresh() {
    clearTimeout(state.tokenTimer);
    if (!canRefresh()) return;
    const wait = Math.max(5000, state.tokenExpiresAt - Date.now() - 60000);
    refreshAfter(wait);
  }

  // A refresh in `wait` ms; one the server could not answer (network,
  // timeout, 5xx, 429) is tried again half a minute later (a refused one
  // has signed the tab out).
  function refreshAfter(wait) {
    clearTimeout(state.tokenTimer);
    state.tokenTimer = setTimeout(() => {
      const gen = state.sessionGen;
      refreshSession().catch(() => {
        if (gen === state.sessionGen && canRefresh()) refreshAfter(RETRY_MAX_MS);
      });
    }, wait);
  }

  // One refresh at a time: a refresh token is good for one use, so every
  // caller waits for the same request. A refused refresh ends the session.
  function canRefresh() {
    return Boolean(state.refreshToken || state.cookieSession);
  }

  // The refresh request itself (under the lock for a cookie session).
  function postRefresh(rt) {
    // A cookie session sends {}: the browser adds the HttpOnly cookie.
    return fetch('/api/v2/auth/refresh', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify(rt ? { refreshToken: rt } : {}),
      credentials: 'same-origin',
      cache: 'no-store',
      // A request that never answers would hold the lock for ever: it
      // fails (as a network failure: no sign-out, tried again later).
      signal: AbortSignal.timeout(LOCKED_REQUEST_MS),
    });
  }

  // Ends a session by its access token, best effort (failures ignored):
  // the tab's old session when a refresh answered a new one of the same
  // user.
  function endSessionByToken(token) {
    return fetch('/api/v2/auth/logout', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
      body: '{}',
      credentials: 'same-origin',
      cache: 'no-store',
      signal: AbortSignal.timeout(LOCKED_REQUEST_MS),
    }).catch(() => {});
  }

  // The cookie is the browser's, not the tab's: another tab's login puts
  // its own session (maybe another user's) there. A refresh that answers
  // another user is not adopted: the tab signs out (and ends its own
  // session, which it still holds an access token of) without keeping the
  // other user's token.
  function refreshSession() {
    if (state.refreshing) return state.refreshing;
    if (!canRefresh()) return Promise.reject(new ApiError('no session', 401));
    const rt = state.refreshToken;
    const gen = state.sessionGen;
    const asked = state.token;
    const userId = state.user ? state.user.id : undefined;
    const oldSid = state.sessionId;
    const run = async () => {
      if (state.sessionGen !== gen) throw new ApiError('the session changed', 0);
      // Another tab of this session refreshed while this one waited for
      // the lock, and told this one its token: no second refresh.
      if (!rt && state.token !== asked && state.tokenExpiresAt - Date.now() > 60000) return state.token;
      const res = await postRefresh(rt);
      if (!res.ok) {
        const msg = await errorMessage(res);
        // Refused (400, 401, 403) ends the session; a server that cannot
        // answer now (5xx, 429) does not.
        if (state.sessionGen === gen && res.status >= 400 && res.status <= 403) {
          logout(refreshRefusedMessage(res.status, msg));
        }
        throw new ApiError(msg, res.status);
      }
      const body = await res.json();
      if (state.sessionGen !== gen) throw new ApiError('the session changed', 0);
      // A session whose user the tab does not know cannot be told from
      // another user's: not adopted either.
      if (!rt && userId === undefined) {
        logout(ENDED_MSG);
        throw new ApiError('the session names no user', 401);
      }
      if (!rt && !(body.user && body.user.id === userId)) {
        logout(OTHER_USER_MSG);
        throw new ApiError('another user signed in in another tab', 401);
      }
      // The same user, another session (they signed in again in another
      // tab): the tab's old session would stay alive on the server; it is
      // ended by its access token first (best effort), then the new one is
      // taken.
      if (!rt && oldSid && body.sessionId && body.sessionId !== oldSid && asked) {
        await endSessionByToken(asked);
        if (state.sessionGen !== gen) throw new ApiError('the session changed', 0);
      }
      adoptSession(body);
      if (!rt) announceToken();
      return state.token;
    };
    state.refreshing = (async () => {
      try {
        return await (rt ? run() : withRefreshLock(run));
      } finally {
        state.refreshing = null;
      }
    })();
    return state.refreshing;
  }

  function loadSession() {
    try {
      const s = JSON.parse(sessionStorage.getItem(SESSION_KEY) || 'null');
      if (s && typeof s.token === 'string') return s;
    } catch (_) { /* ignore */ }
    return null;
  }

  async function login(ev) {
    ev.preventDefault();
    const email = $('email');
    const password = $('password');
    const err = $('login-error');
    err.textContent = '';
    email.removeAttribute('aria-invalid');
    password.removeAttribute('aria-invalid');
    if (!email.value.trim()) {
      email.setAttribute('aria-invalid', 'true');
      err.textContent = 'Enter your email address.';
      email.focus();
      return;
    }
    if (!password.value) {
      password.setAttribute('aria-invalid', 'true');
      err.textContent = 'Enter your password.';
      password.focus();
      return;
    }
    const btn = $('login-submit');
    btn.disabled = true;
    btn.textContent = 'Signing in…';
    try {
      // Under the refresh lock: a refresh of another tab answering after
      // this login would put the old session's rotated token in the cookie
      // over the new one.
      const body = JSON.stringify({ email: email.value.trim(), password: password.value, refreshCookie: true });
      const res = await withRefreshLock(() => fetch('/api/v2/auth/login', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body,
        credentials: 'same-origin',
        cache: 'no-store',
        signal: AbortSignal.timeout(LOCKED_REQUEST_MS),
      }));
      if (!res.ok) {
        const msg = res.status === 401 ? 'Wrong email or password.' : await errorMessage(res);
        password.setAttribute('aria-invalid', 'true');
        err.textContent = msg;
        password.select();
        return;
      }
      state.sessionGen += 1;
      adoptSession(await res.json());
      password.value = '';
      start();
    } catch (e) {
      err.textContent = `Cannot reach the server (${e.message}).`;
    } finally {
      btn.disabled = false;
      btn.textContent = 'Sign in';
    }
  }

  // Ends this tab's session on the server (every instance refuses its
  // tokens). A cookie session names it by its access token: the cookie may
  // hold another tab's session (another user's), which is left alone; when
  // it is this session's, the answer removes it. For a logout the user
  // asked for (`mayRefresh`), an access token that has expired by the
  // clock, or that the server refuses (401: access changed, secret
  // rotated), is refreshed under the lock, once, if the cookie still gives
  // this user's session, and the logout sent again with the new one; a
  // refresh answering another user or session is not used.
  async function endServerSession(ended, mayRefresh) {
    const send = (headers, body) => fetch('/api/v2/auth/logout', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', ...headers },
      body: JSON.stringify(body),
      credentials: 'same-origin',
      keepalive: true,
    });
    if (ended.refreshToken) {
      await send({}, { refreshToken: ended.refreshToken });
      return;
    }
    const ownToken = () => withRefreshLock(async () => {
      const res = await postRefresh(null);
      if (!res.ok) return null;
      const body = await res.json();
      // Only this tab's own session is ended (the cookie may hold another's).
      const ours = body.user && ended.user && body.user.id === ended.user.id
        && (!ended.sessionId || body.sessionId === ended.sessionId);
      return ours ? body.token : null;
    });
    let token = ended.token;
    let refreshed = false;
    if (ended.tokenExpiresAt - Date.now() < 5000) {
      if (!mayRefresh) return;
      token = await ownToken();
      refreshed = true;
      if (!token) return;
    }
    const res = await send({ Authorization: `Bearer ${token}` }, {});
    if (res.status !== 401 || !mayRefresh || refreshed) return;
    token = await ownToken();
    if (token) await send({ Authorization: `Bearer ${token}` }, {});
  }

  // `opts.endSession`: a logout the user asked for (an expired access
  // token is refreshed to end the session).
  function logout(message, opts = {}) {
    const ws = state.ws;
    if (canRefresh() && state.token) {
      endServerSession({
        refreshToken: state.refreshToken,
        token: state.token,
        tokenExpiresAt: state.tokenExpiresAt,
        user: state.user,
        sessionId: state.sessionId,
      }, opts.endSession === true).catch(() => {});
    }
    state.sessionGen += 1;
    state.refreshToken = null;
    state.cookieSession = false;
    state.sessionId = null;
    state.tokenExpiresAt = 0;
    clearTimeout(state.tokenTimer);
    state.token = null;
    state.user = null;
    state.ws = null;
    if (ws) ws.close(1000, 'logout');
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    clearInterval(state.pingTimer);
    state.reconnectTimer = null;
    try { sessionStorage.removeItem(SESSION_KEY); } catch (_) { /* ignore */ }
    state.wsSubs = new Set();
    state.lastEventId = null;
    state.epoch = null;
    state.everConnected = false;
    state.attempt = 0;
    state.wsRefreshTried = false;
    clearUserData();
    $('session').hidden = true;
    $('reconnect-banner').hidden = true;
    $('dashboard-view').hidden = true;
    $('login-view').hidden = false;
    $('login-error').textContent = typeof message === 'string' ? message : '';
    $('email').focus();
  }

  // Forgets every figure of the session and empties what showed them: the
  // next user to sign in in this tab sees nothing of the previous one's, even
  // while their own answers are on the way or if they fail. Answers still in
  // flight are dropped (the sequence numbers move; loadStores and loadUsers
  // check the session).
  function clearUserData() {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = null;
    state.refreshFlash = new Set();
    clearTimeout(state.analyticsTimer);
    state.analyticsTimer = null;
    clearTimeout(state.usersTimer);
    state.usersTimer = null;
    for (const t of ['summaryRetry', 'analyticsRetry', 'storesRetry']) {
      clearTimeout(state[t]);
      state[t] = null;
    }
    state.summaryFailures = 0;
    state.analyticsFailures = 0;
    state.storesFailures = 0;
    $('stores-error').hidden = true;
    $('stores-error').textContent = '';
    state.summarySeq += 1;
    state.analyticsSeq += 1;
    state.storesSeq += 1;
    state.users = [];
    state.stores.clear();
    state.byStore = null;
    state.byRegion = null;
    state.summaryError = null;
    state.salesVersions.clear();
    state.seen.clear();
    state.seenOrder = [];
    state.exportJob = null;
    state.exportProgressEvents = 0;
    state.month = currentMonth();
    $('month').value = state.month;
    $('who').textContent = '';
    $('store-filter').value = '';
    $('feed').replaceChildren();
    $('feed-empty').hidden = false;
    $('users-card').hidden = true;
    $('users').querySelector('tbody').replaceChildren();
    $('users-count').textContent = '';
    $('user-error').textContent = '';
    $('export-status').textContent = '';
    $('export-progress').hidden = true;
    renderStores();
    $('stores-count').textContent = '';
    renderChart();
    renderRegions();
    renderRegionMonths([], analyticsYear(), 'Loading…');
    renderYoy([], analyticsYear());
    yoyNote('Loading…');
  }

  function showUser() {
    $('who').textContent = state.user ? `${state.user.email} · ${state.user.role}` : '';
  }

  function start() {
    $('login-view').hidden = true;
    $('dashboard-view').hidden = false;
    $('session').hidden = false;
    showUser();
    $('month').value = state.month;
    $('main').focus();
    loadStoresAndSubscribe();
    loadSummaries();
    loadAnalytics();
    connect();
    startUsers();
  }

  // ---------- stores ----------

  // Every store of the caller's scope, a page of 1,000 (the API's most) at
  // a time, up to 100,000.
  async function loadStores(seq) {
    const gen = state.sessionGen;
    const all = [];
    for (let offset = 0; offset < 100000; offset += 1000) {
      const body = await api(`/api/v2/stores?limit=1000&offset=${offset}`);
      if (gen !== state.sessionGen) throw new ApiError('the session changed', 0);
      if (seq !== state.storesSeq) throw new ApiError('a newer load began', 0);
      const page = body.data || [];
      all.push(...page);
      if (page.length < 1000) break;
    }
    state.stores.clear();
    for (const s of all) state.stores.set(Number(s.id), s);
    renderStores();
    // Names may have arrived after the chart.
    renderChart();
  }

  // A delay before the next try of a failed load: doubling from a second
  // to half a minute, with some jitter.
  function retryDelay(failures) {
    const exp = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** Math.min(failures, 10));
    return Math.round(exp * (0.8 + Math.random() * 0.4));
  }

  // Whether and when a failed load is tried again: a network failure (no
  // status), a server error (5xx) and 429 are (429 after its Retry-After
  // seconds when it gives them); anything else (400, 403, 404, 422, ...) is
  // final and only shown. Returns the delay in ms, or null for no retry.
  function retryPlan(status, retryAfter, failures) {
    if (typeof status === 'number' && !(status >= 500 || status === 429)) return null;
    if (status === 429 && Number.isFinite(retryAfter) && retryAfter >= 0) return retryAfter * 1000;
    return retryDelay(failures);
  }

  function retryPlanFor(e, failures) {
    return retryPlan(e && typeof e.status === 'number' ? e.status : undefined, e && e.retryAfter, failures);
  }

  // The store list, then the subscriptions. A failure is shown in the
  // Stores card and tried again (backoff) while it may pass (retryPlan).
  // Only the latest load's answer counts (storesSeq), so overlapping loads
  // schedule one retry at most.
  function loadStoresAndSubscribe() {
    clearTimeout(state.storesRetry);
    state.storesRetry = null;
    const gen = state.sessionGen;
    const seq = ++state.storesSeq;
    const shown = $('stores-error');
    return loadStores(seq).then(() => {
      if (seq !== state.storesSeq) return;
      state.storesFailures = 0;
      shown.hidden = true;
      shown.textContent = '';
      subscribeAll();
    }, (e) => {
      if (gen !== state.sessionGen || seq !== state.storesSeq || !state.token || e.status === 401) return;
      const delay = retryPlanFor(e, state.storesFailures);
      shown.hidden = false;
      if (delay === null) {
        shown.textContent = `Could not load the stores (${e.message}).`;
        return;
      }
      state.storesFailures += 1;
      shown.textContent = `Could not load the stores (${e.message}); trying again in ${Math.ceil(delay / 1000)} s.`;
      clearTimeout(state.storesRetry);
      state.storesRetry = setTimeout(loadStoresAndSubscribe, delay);
    });
  }

  function renderStores(flashId) {
    const filter = $('store-filter').value.trim().toLowerCase();
    const list = $('stores');
    const items = [];
    const all = [...state.stores.values()].sort((a, b) => String(a.code).localeCompare(String(b.code)));
    const counts = { open: 0, closed: 0, renovating: 0 };
    for (const s of all) {
      counts[s.status] = (counts[s.status] || 0) + 1;
      const hay = `${s.name} ${s.code} ${s.region} ${s.status}`.toLowerCase();
      if (filter && !hay.includes(filter)) continue;
      const li = el('li', { 'data-store-id': s.id, 'data-status': s.status },
        el('span', { class: 'store-name' },
          bdi(s.name), ' ',
          el('span', { class: 'store-meta' }, bdi(s.code), ' · ', bdi(s.region))),
        el('span', { class: `badge badge-${s.status}`, text: s.status }));
      if (flashId !== undefined && Number(s.id) === Number(flashId)) {
        li.classList.add('flash');
        setTimeout(() => li.classList.remove('flash'), 2000);
      }
      items.push(li);
    }
    list.replaceChildren(...items);
    $('stores-count').textContent =
      `(${all.length}: ${counts.open} open, ${counts.closed} closed, ${counts.renovating} renovating)`;
  }

  // ---------- summaries ----------

  // A failed load is shown and, while it may pass (retryPlan), tried again
  // (backoff) until it succeeds.
  async function loadSummaries() {
    clearTimeout(state.summaryRetry);
    state.summaryRetry = null;
    const seq = ++state.summarySeq;
    const m = state.month;
    const q = `from=${encodeURIComponent(m)}&to=${encodeURIComponent(m)}`;
    try {
      const [stores, regions] = await Promise.all([
        api(`/api/v2/sales/summary?groupBy=store&${q}`),
        api(`/api/v2/sales/summary?groupBy=region&${q}`),
      ]);
      if (seq !== state.summarySeq) return; // a newer request won
      state.byStore = stores.data || [];
      state.byRegion = regions.data || [];
      state.summaryError = null;
      state.summaryFailures = 0;
      const flash = state.refreshFlash;
      state.refreshFlash = new Set();
      renderChart(flash);
      renderRegions(flash.size > 0);
    } catch (e) {
      if (e.status === 401 || seq !== state.summarySeq) return;
      state.summaryError = `Could not load the sales summary: ${e.message}`;
      if (!state.byStore) {
        // Nothing shown yet: the chart and the region totals say why.
        renderChart();
        renderRegions();
      }
      $('chart-caption').textContent = state.summaryError;
      const delay = retryPlanFor(e, state.summaryFailures);
      if (delay === null) return; // final (400, 403, 404, 422, ...): shown only
      state.summaryFailures += 1;
      state.summaryRetry = setTimeout(loadSummaries, delay);
    }
  }

  // Debounced refetch; under a steady stream of events it still runs every
  // REFRESH_MAX_WAIT_MS.
  function scheduleRefresh(storeId) {
    if (storeId !== undefined && storeId !== null) state.refreshFlash.add(String(storeId));
    const now = Date.now();
    if (!state.refreshTimer) state.refreshFirstAt = now;
    clearTimeout(state.refreshTimer);
    const wait = Math.max(0, Math.min(REFRESH_DEBOUNCE_MS, state.refreshFirstAt + REFRESH_MAX_WAIT_MS - now));
    state.refreshTimer = setTimeout(() => {
      state.refreshTimer = null;
      loadSummaries();
    }, wait);
  }

  function renderChart(flash) {
    const svgEl = $('chart');
    const wrap = $('chart-wrap');
    $('chart-month').textContent = `· ${monthLabel(state.month)}`;
    $('regions-month').textContent = `· ${monthLabel(state.month)}`;
    const rows = [...(state.byStore || [])].sort((a, b) => num(b.totalSales) - num(a.totalSales));
    // No rows: none yet this month, or not loaded (yet).
    const none = state.byStore ? `No sales reported for ${monthLabel(state.month)} yet.` : state.summaryError || 'Loading…';
    const shown = state.topN > 0 ? rows.slice(0, state.topN) : rows;
    const width = Math.max(260, Math.floor(wrap.clientWidth || 600));
    // Narrow (phone) widths put each store's name above its bar.
    const narrow = width < 520;
    const rowH = narrow ? 40 : 26;
    const top = 22;
    const labelW = narrow ? 0 : Math.min(220, Math.floor(width * 0.36));
    const x0 = narrow ? 2 : labelW;
    const valueW = narrow ? 52 : 70;
    const barMax = Math.max(40, width - x0 - valueW - 8);
    const barY = narrow ? 20 : 4;
    const barH = narrow ? 15 : rowH - 8;
    const textY = narrow ? 32 : 17;
    const height = top + Math.max(1, shown.length) * rowH + 6;
    svgEl.setAttribute('viewBox', `0 0 ${width} ${height}`);
    svgEl.setAttribute('width', String(width));
    svgEl.setAttribute('height', String(height));
    const total = rows.reduce((acc, r) => acc + num(r.totalSales), 0);
    const parts = [];
    if (shown.length === 0) {
      parts.push(svg('text', { class: 'empty', x: 8, y: top + 16 }, none));
    } else {
      const max = Math.max(...shown.map((r) => num(r.totalSales)), 1);
      const ticks = narrow ? 2 : 4;
      for (let i = 0; i <= ticks; i++) {
        const x = x0 + (barMax * i) / ticks;
        parts.push(svg('line', { class: 'grid-line', x1: x, x2: x, y1: top - 4, y2: height - 4 }));
        parts.push(svg('text', { class: 'axis', x, y: 12, 'text-anchor': i === 0 ? 'start' : 'middle' }, compact.format((max * i) / ticks)));
      }
      const maxChars = Math.max(6, Math.floor(((narrow ? width : labelW) - 8) / 7));
      shown.forEach((r, i) => {
        const value = num(r.totalSales);
        const y = top + i * rowH;
        const known = state.stores.get(Number(r.key));
        const storeName = r.storeName ? r.storeName : known ? known.name : `store ${r.key}`;
        const storeCode = r.storeName ? r.storeCode : known ? known.code : '';
        const name = storeCode ? `${storeName} (${storeCode})` : storeName;
        // Cut between characters as the reader sees them (grapheme
        // clusters): never inside an emoji sequence, a flag or a letter
        // with its accent.
        const chars = graphemes(name);
        const cut = chars.length > maxChars;
        const kept = cut ? chars.slice(0, maxChars - 1) : chars;
        // The store's name in an isolating tspan: a direction control in
        // it stays inside (the code and the cut's ellipsis stay in place).
        const inName = Math.min(graphemes(storeName).length, kept.length);
        const label = () => {
          const t = svg('tspan', { class: 'isolate name' }, kept.slice(0, inName).join(''));
          return [t, `${kept.slice(inName).join('')}${cut ? '…' : ''}`];
        };
        const w = Math.max(value > 0 ? 2 : 0, Math.round((value / max) * barMax));
        const g = svg('g', { class: 'row', 'data-store-id': r.key, 'data-value': String(value) });
        g.append(svg('title', {}, `${isolated(storeName)}${storeCode ? ` (${storeCode})` : ''}: ${nf2.format(value)} sales, ${nf0.format(num(r.totalCustomers))} customers`));
        const labelEl = narrow
          ? svg('text', { class: 'label above', x: x0, y: y + 15, 'text-anchor': 'start' })
          : svg('text', { class: 'label', x: labelW - 6, y: y + 17, 'text-anchor': 'end' });
        labelEl.append(...label());
        g.append(labelEl);
        const bar = svg('rect', { class: 'bar', x: x0, y: y + barY, width: w, height: barH, rx: 3, 'data-value': String(value) });
        if (flash && flash.has(String(r.key))) {
          bar.classList.add('flash');
          setTimeout(() => bar.classList.remove('flash'), 1500);
        }
        g.append(bar);
        const text = compact.format(value);
        const inside = w > barMax - 4 && w > 60;
        g.append(svg('text', {
          class: inside ? 'value inside' : 'value',
          x: inside ? x0 + w - 6 : x0 + w + 6,
          y: y + textY,
          'text-anchor': inside ? 'end' : 'start',
        }, text));
        parts.push(g);
      });
    }
    svgEl.replaceChildren(...parts);
    const which = state.topN > 0 && rows.length > state.topN ? `Top ${shown.length} of ${rows.length} stores` : `${rows.length} stores`;
    $('chart-caption').textContent = rows.length
      ? `${which} by sales in ${monthLabel(state.month)}; all stores together: ${nf2.format(total)}.`
      : none;
    const tbody = $('chart-table').tBodies[0];
    tbody.replaceChildren(...rows.map((r) => el('tr', {},
      el('th', { scope: 'row' }, ...(r.storeName ? nameParts(r.storeName, r.storeCode) : storeParts(r.key))),
      el('td', { class: 'num', text: nf2.format(num(r.totalSales)) }),
      el('td', { class: 'num', text: nf0.format(num(r.totalCustomers)) }))));
  }

  function renderRegions(flash) {
    const rows = [...(state.byRegion || [])].sort((a, b) => num(b.totalSales) - num(a.totalSales));
    const total = rows.reduce((acc, r) => acc + num(r.totalSales), 0);
    const customers = rows.reduce((acc, r) => acc + num(r.totalCustomers), 0);
    const stores = rows.reduce((acc, r) => acc + num(r.stores), 0);
    const body = $('regions').tBodies[0];
    body.replaceChildren(...rows.map((r) => {
      const share = total > 0 ? (num(r.totalSales) / total) * 100 : 0;
      const tr = el('tr', { 'data-region': r.key, 'data-value': String(num(r.totalSales)) },
        el('th', { scope: 'row' }, bdi(r.key),
          el('span', { class: 'share', style: { width: `${share.toFixed(1)}%` }, 'aria-hidden': 'true' })),
        el('td', { class: 'num', text: nf0.format(num(r.totalSales)) }),
        el('td', { class: 'num', text: nf0.format(num(r.totalCustomers)) }),
        el('td', { class: 'num', text: nf0.format(num(r.stores)) }));
      return tr;
    }));
    if (rows.length === 0) {
      const none = state.byRegion ? 'No sales this month yet.' : state.summaryError || 'Loading…';
      body.append(el('tr', {}, el('td', { colspan: '4', class: 'muted', text: none })));
    }
    $('regions-total-sales').textContent = nf0.format(total);
    $('regions-total-customers').textContent = nf0.format(customers);
    $('regions-total-stores').textContent = nf0.format(stores);
    const foot = $('regions').tFoot.rows[0];
    if (flash) {
      foot.classList.add('flash');
      setTimeout(() => foot.classList.remove('flash'), 1500);
    }
  }

  // ---------- analytics: region x month, this year against last ----------

  const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

  function analyticsYear() {
    return Number(String(state.month).slice(0, 4));
  }

  // The year-over-year chart reads both years' own months in one request
  // (groupBy=month from January of last year to December of this one), not
  // compareTo=previousYear: that answers no row for a month of this year
  // that has not begun, so last year's bar for it would read 0.
  async function loadAnalytics() {
    clearTimeout(state.analyticsTimer);
    state.analyticsTimer = null;
    clearTimeout(state.analyticsRetry);
    state.analyticsRetry = null;
    const seq = ++state.analyticsSeq;
    const y = analyticsYear();
    try {
      const [grid, yoy] = await Promise.all([
        api(`/api/v2/sales/summary?groupBy=region,month&metrics=totalSales&year=${y}`),
        api(`/api/v2/sales/summary?groupBy=month&metrics=totalSales&from=${y - 1}-01&to=${y}-12`),
      ]);
      if (seq !== state.analyticsSeq) return; // a newer request won
      state.analyticsFailures = 0;
      renderRegionMonths(grid.data || [], y);
      renderYoy(yoy.data || [], y);
    } catch (e) {
      if (e.status === 401 || seq !== state.analyticsSeq) return;
      yoyNote(`Could not load the analytics: ${e.message}`);
      if (!$('region-months').tBodies[0].querySelector('tr[data-region]')) {
        renderRegionMonths([], y, 'Could not load the analytics.');
      }
      const delay = retryPlanFor(e, state.analyticsFailures);
      if (delay === null) return; // final: shown only
      state.analyticsFailures += 1;
      state.analyticsRetry = setTimeout(loadAnalytics, delay);
    }
  }

  function scheduleAnalytics() {
    if (state.analyticsTimer) return;
    state.analyticsTimer = setTimeout(() => {
      state.analyticsTimer = null;
      loadAnalytics();
    }, REFRESH_DEBOUNCE_MS);
  }

  // Everything the page shows from the API, fetched again: after a
  // reconnect, a change of access (4012: the token now has another scope),
  // `resync_required` and a truncated table. The figures are debounced like
  // the live refreshes, so the sales events of a replay add no requests.
  function reloadAll() {
    showUser();
    scheduleRefresh();
    scheduleAnalytics();
    loadStoresAndSubscribe();
    startUsers();
  }

  // `empty`: what an empty table says (default: no sales that year yet).
  function renderRegionMonths(rows, y, empty) {
    $('analytics-year').textContent = `· ${y}`;
    const table = $('region-months');
    const months = MONTHS.map((_, i) => `${y}-${String(i + 1).padStart(2, '0')}`);
    const byRegion = new Map();
    for (const r of rows) {
      if (!byRegion.has(r.region)) byRegion.set(r.region, new Map());
      byRegion.get(r.region).set(r.month, num(r.totalSales));
    }
    table.tHead.replaceChildren(el('tr', {},
      el('th', { scope: 'col', text: 'Region' }),
      ...MONTHS.map((m) => el('th', { scope: 'col', class: 'num', text: m })),
      el('th', { scope: 'col', class: 'num', text: 'Year' })));
    const regions = [...byRegion.keys()].sort();
    table.tBodies[0].replaceChildren(...regions.map((region) => {
      const cells = byRegion.get(region);
      let total = 0;
      const tds = months.map((ym) => {
        const v = cells.get(ym);
        total += v || 0;
        return el('td', { class: 'num', 'data-month': ym, 'data-value': String(v || 0), text: v === undefined ? '–' : compact.format(v) });
      });
      return el('tr', { 'data-region': region },
        el('th', { scope: 'row' }, bdi(region)), ...tds,
        el('td', { class: 'num', 'data-value': String(total), text: compact.format(total) }));
    }));
    if (regions.length === 0) {
      table.tBodies[0].append(el('tr', {}, el('td', { colspan: '14', class: 'muted', text: empty || `No sales in ${y} yet.` })));
    }
    $('analytics-caption').textContent = 'Sales per region and month; updates live.';
  }

  // rows: groupBy=month over last year and this one.
  function renderYoy(rows, y) {
    const chart = $('yoy-chart');
    const byMonth = new Map(rows.map((r) => [r.month, num(r.totalSales)]));
    const data = MONTHS.map((label, i) => {
      const mm = String(i + 1).padStart(2, '0');
      return { label, cur: byMonth.get(`${y}-${mm}`) || 0, prev: byMonth.get(`${y - 1}-${mm}`) || 0 };
    });
    const width = Math.max(260, Math.floor(chart.clientWidth || 600));
    const height = 180;
    const top = 8;
    const bottom = 20;
    const max = Math.max(1, ...data.map((d) => Math.max(d.cur, d.prev)));
    const slot = width / 12;
    const bar = Math.max(2, slot * 0.35);
    chart.setAttribute('viewBox', `0 0 ${width} ${height}`);
    const parts = [];
    data.forEach((d, i) => {
      const x = i * slot + slot * 0.12;
      const h = (v) => ((height - top - bottom) * v) / max;
      const ym = `${y}-${String(i + 1).padStart(2, '0')}`;
      const prev = svg('rect', { class: 'prev', x: x.toFixed(1), width: bar.toFixed(1), y: (height - bottom - h(d.prev)).toFixed(1), height: h(d.prev).toFixed(1), 'data-month': ym, 'data-value': String(d.prev) });
      prev.append(svg('title', {}, `${d.label} ${y - 1}: ${nf0.format(d.prev)}`));
      const cur = svg('rect', { class: 'cur', x: (x + bar).toFixed(1), width: bar.toFixed(1), y: (height - bottom - h(d.cur)).toFixed(1), height: h(d.cur).toFixed(1), 'data-month': ym, 'data-value': String(d.cur) });
      cur.append(svg('title', {}, `${d.label} ${y}: ${nf0.format(d.cur)}`));
      parts.push(prev, cur, svg('text', { x: (x + bar).toFixed(1), y: String(height - 6), 'text-anchor': 'middle' }, d.label));
    });
    chart.replaceChildren(...parts);
    const cmp = yoyCompare(rows, y);
    const caption = $('yoy-caption');
    caption.textContent = cmp.text;
    caption.dataset.months = String(cmp.months);
    caption.dataset.cur = String(cmp.cur);
    caption.dataset.prev = String(cmp.prev);
    caption.dataset.partial = String(cmp.partial);
  }

  // The year-over-year caption says "Loading…" or why it could not load.
  function yoyNote(text) {
    const caption = $('yoy-caption');
    caption.textContent = text;
    delete caption.dataset.months;
    delete caption.dataset.cur;
    delete caption.dataset.prev;
    delete caption.dataset.partial;
  }

  const MONTH_NAMES = ['January', 'February', 'March', 'April', 'May', 'June', 'July',
    'August', 'September', 'October', 'November', 'December'];

  // How many months of `y` have begun on `today`: all twelve of a past
  // year, January to this month of the current one, none of a year to come.
  // In UTC, as the server's months are.
  function monthsBegun(y, today) {
    const ty = today.getUTCFullYear();
    if (y < ty) return 12;
    if (y > ty) return 0;
    return today.getUTCMonth() + 1;
  }

  // The caption's comparison: the months of `y` that have begun against
  // the same months of `y - 1` (it compared this year so far with all of
  // last year: "-99.7%" in January). rows: groupBy=month over both years.
  // The page has monthly totals only, so the current month (in progress)
  // cannot be cut at today's day of last year's: the caption says it is
  // partial (`partial`: this month so far against all of last year's).
  function yoyCompare(rows, y, today = new Date()) {
    const day = today instanceof Date ? today : new Date(today);
    const byMonth = new Map(rows.map((r) => [r.month, num(r.totalSales)]));
    const months = monthsBegun(y, day);
    const partial = y === day.getUTCFullYear(); // the current year: its last month is in progress
    let cur = 0;
    let prev = 0;
    let prevYear = 0;
    for (let i = 1; i <= 12; i++) {
      const mm = String(i).padStart(2, '0');
      const p = byMonth.get(`${y - 1}-${mm}`) || 0;
      prevYear += p;
      if (i <= months) {
        cur += byMonth.get(`${y}-${mm}`) || 0;
        prev += p;
      }
    }
    if (months === 0) {
      return {
        months, cur, prev, change: null, partial: false,
        text: `No month of ${y} has begun yet · ${y - 1} (grey): ${nf0.format(prevYear)} in the whole year`,
      };
    }
    const change = prev > 0 ? ((cur - prev) / prev) * 100 : null;
    const range = months === 1 ? MONTHS[0] : `${MONTHS[0]}–${MONTHS[months - 1]}`;
    const head = partial
      ? `${range} (${MONTH_NAMES[months - 1]} so far) against ${range} of ${y - 1}`
      : `${range} (the whole year) against the same months of ${y - 1}`;
    return {
      months, cur, prev, change, partial,
      text: `${head}: ${y} (blue): ${nf0.format(cur)} · ${y - 1} (grey): ${nf0.format(prev)}${change === null ? '' : ` (${change >= 0 ? '+' : ''}${change.toFixed(1)}%)`}`,
    };
  }

  // ---------- feed ----------

  function addFeed(kindClass, kindText, text, ts, id) {
    const feed = $('feed');
    const when = ts ? new Date(ts) : new Date();
    const li = el('li', { class: 'new', 'data-event-id': id ?? '' },
      el('time', { datetime: when.toISOString(), text: when.toLocaleTimeString() }),
      el('span', { class: `kind kind-${kindClass}`, text: kindText }),
      el('span', { class: 'text' }, ...[].concat(text)));
    feed.prepend(li);
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
    $('feed-empty').hidden = true;
  }

  // ---------- WebSocket ----------

  function setConn(kind, text) {
    const c = $('conn');
    c.dataset.state = kind;
    $('conn-text').textContent = text;
  }

  function wsUrl() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${proto}//${location.host}/ws?token=${encodeURIComponent(state.token)}`;
  }

  function send(msg) {
    const ws = state.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(msg));
      return true;
    }
    return false;
  }

  // One subscription follows the whole chain (a scoped token gets its own
  // stores' events), however many stores there are.
  function wantedChannels() {
    const ch = ['stores', 'announcements', 'all-stores'];
    if (isAdmin()) ch.push('admin');
    return ch;
  }

  function subscribeAll() {
    for (const event of wantedChannels()) {
      if (state.wsSubs.has(event)) continue;
      if (send({ type: 'subscribe', event })) state.wsSubs.add(event);
    }
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    state.reconnectTimer = null;
    if (!state.token) return;
    if (canRefresh() && state.tokenExpiresAt - Date.now() < 5000) {
      // An expired token would only be refused at the upgrade.
      refreshSession().then(connect, () => { if (state.token) scheduleReconnect(); });
      return;
    }
    if (state.ws) {
      const old = state.ws;
      state.ws = null;
      old.close(1000, 'reconnecting');
    }
    if (state.attempt === 0 && !state.everConnected) setConn('connecting', 'Connecting…');
    else setConn('reconnecting', 'Reconnecting…');
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (e) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    state.wsSubs = new Set();
    let opened = false;
    ws.onopen = () => {
      if (state.ws !== ws) return;
      opened = true;
      const wasDown = state.everConnected;
      state.everConnected = true;
      state.attempt = 0;
      state.wsRefreshTried = false;
      state.lastMessageAt = Date.now();
      state.lastTickAt = state.lastMessageAt;
      state.silentMs = 0;
      setConn('live', 'Live');
      $('reconnect-banner').hidden = true;
      // After a drop, one resume subscribes and replays what was missed
      // (nothing on those channels arrives live before the replay);
      // otherwise plain subscriptions.
      if (state.lastEventId !== null) {
        const events = wantedChannels();
        const resume = { type: 'resume', lastEventId: state.lastEventId, events };
        // Ids are given again after a restore: the server tells an id of
        // another epoch to resync instead of replaying other events.
        if (state.epoch) resume.epoch = state.epoch;
        if (send(resume)) {
          for (const event of events) state.wsSubs.add(event);
        }
      } else {
        subscribeAll();
      }
      clearInterval(state.pingTimer);
      state.pingTimer = setInterval(heartbeat, PING_EVERY_MS / 2);
      if (wasDown) {
        addFeed('other', 'Reconnected', 'Live updates resumed.', null, null);
        // Whatever the replay brings, everything is refetched once.
        reloadAll();
      }
    };
    ws.onmessage = (e) => {
      if (state.ws !== ws) return;
      state.lastMessageAt = Date.now();
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch (_) {
        return;
      }
      handleMessage(msg);
    };
    ws.onclose = (e) => {
      if (state.ws !== ws) return;
      state.ws = null;
      clearInterval(state.pingTimer);
      if (!state.token) return;
      if (WS_ENDED[e.code]) {
        logout(WS_ENDED[e.code]);
        return;
      }
      if ((e.code === 4001 || e.code === 4012) && canRefresh()) {
        // Token expired, or role/stores changed: a refreshed token has the new scope.
        refreshSession().then(() => {
          state.attempt = 0;
          connect();
          // The stores, totals and analytics of the new scope (also if the
          // reconnect fails).
          if (e.code === 4012) reloadAll();
        }, () => { if (state.token) scheduleReconnect(); });
        return;
      }
      if (e.code === 4001) {
        logout('Your session has expired; please sign in again.');
        return;
      }
      if (!opened && !state.wsRefreshTried && canRefresh()) {
        // Closed before it opened: the upgrade may have been refused
        // (401: the token was revoked, or the signing secret rotated, while
        // the socket was down). One refresh per streak of failures, then
        // at once another try; the backoff is for what a refresh cannot fix.
        state.wsRefreshTried = true;
        refreshSession().then(() => {
          if (!state.token) return;
          state.attempt = 0;
          connect();
        }, () => { if (state.token) scheduleReconnect(); });
        return;
      }
      scheduleReconnect();
    };
    ws.onerror = () => { /* a close event follows */ };
  }

  // The silence counted after a heartbeat tick. The time since the
  // previous tick counts for at most one and a half of the timer's period:
  // a hidden tab's timers fire as rarely as once a minute (and not at all
  // while the machine sleeps), and that lateness is the timer's, not the
  // socket's. Anything heard since the previous tick starts it again. The
  // pong to each tick's ping arrives between ticks (network events are not
  // throttled), so a healthy hidden socket never reaches the limit; a dead
  // one does, after a few of the late ticks.
  function silenceAfterTick(silentMs, { now, lastTickAt, lastMessageAt, tickMs }) {
    const cap = tickMs * 1.5;
    if (lastMessageAt >= lastTickAt) return Math.min(Math.max(0, now - lastMessageAt), cap);
    return silentMs + Math.min(Math.max(0, now - lastTickAt), cap);
  }

  function heartbeat() {
    if (!state.ws) return;
    const now = Date.now();
    state.silentMs = silenceAfterTick(state.silentMs, {
      now, lastTickAt: state.lastTickAt, lastMessageAt: state.lastMessageAt, tickMs: PING_EVERY_MS / 2,
    });
    state.lastTickAt = now;
    if (state.silentMs > SILENCE_LIMIT_MS) {
      // Nothing heard (not even a pong): the connection is dead.
      const ws = state.ws;
      ws.onclose({ code: 4000 });
      ws.close();
      return;
    }
    send({ type: 'ping' });
  }

  function scheduleReconnect() {
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    const exp = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const delay = Math.round(exp * (0.75 + Math.random() * 0.5));
    state.attempt += 1;
    state.reconnectAt = Date.now() + delay;
    setConn('reconnecting', 'Reconnecting…');
    const banner = $('reconnect-banner');
    banner.hidden = false;
    const tick = () => {
      const s = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
      $('reconnect-text').textContent = s > 0
        ? `Live updates interrupted: reconnecting in ${s} s (attempt ${state.attempt})…`
        : `Live updates interrupted: reconnecting (attempt ${state.attempt})…`;
    };
    tick();
    state.countdownTimer = setInterval(tick, 1000);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function remember(id) {
    if (state.seen.has(id)) return false;
    state.seen.add(id);
    state.seenOrder.push(id);
    if (state.seenOrder.length > SEEN_MAX) state.seen.delete(state.seenOrder.shift());
    return true;
  }

  function handleMessage(msg) {
    if (msg.type) {
      switch (msg.type) {
        case 'ready':
          state.readyLast = Number.isFinite(msg.lastEventId) ? msg.lastEventId : null;
          state.readyEpoch = typeof msg.epoch === 'string' ? msg.epoch : null;
          if (state.lastEventId === null && state.readyLast !== null) {
            state.lastEventId = state.readyLast;
            state.epoch = state.readyEpoch;
          }
          break;
        case 'resumed':
          state.epoch = state.readyEpoch;
          if (msg.replayed > 0) {
            addFeed('other', 'Caught up', `${msg.replayed} event${msg.replayed === 1 ? '' : 's'} missed while offline were replayed.`, null, null);
          }
          break;
        case 'error':
          if (msg.code === 'resync_required') {
            // What was missed cannot be replayed (too much, or pruned); the
            // subscriptions stand and live events continue: reload through
            // the REST API.
            addFeed('other', 'Reloaded', 'The missed events could not be replayed; everything was reloaded.', null, null);
            // Later resumes start from this connection's start, in its epoch.
            if (state.readyEpoch !== state.epoch) {
              // Another log (a restore): its ids and versions are given
              // again, so what was seen of the old one says nothing.
              state.seen = new Set();
              state.seenOrder = [];
              state.salesVersions.clear();
            }
            if (state.readyLast !== null) {
              state.lastEventId = state.readyLast;
              state.epoch = state.readyEpoch;
            }
            reloadAll();
            break;
          }
          if (msg.event) state.wsSubs.delete(msg.event);
          console.warn('websocket error', msg.code, msg.message, msg.event || '');
          break;
        default:
          break; // subscribed, unsubscribed, pong
      }
      return;
    }
    if (!msg.event) return;
    if (msg.id !== undefined && msg.id !== null) {
      if (!remember(msg.id)) return; // a replayed duplicate
      state.lastEventId = msg.id;
    }
    handleEvent(msg.event, msg.data || {}, msg.ts, msg.id);
  }

  const SALES_VERBS = {
    'sales-data-created': 'Sales reported',
    'sales-data-updated': 'Sales updated',
    'sales-data-deleted': 'Sales deleted',
  };

  function handleEvent(kind, d, ts, id) {
    switch (kind) {
      case 'sales-data-created':
      case 'sales-data-updated':
      case 'sales-data-deleted': {
        const rowId = d.id;
        if (rowId !== undefined && d.version !== undefined) {
          const seen = state.salesVersions.get(rowId);
          // Transactions can commit out of order: keep the highest version.
          if (seen !== undefined && seen >= d.version && kind !== 'sales-data-deleted') return;
          state.salesVersions.set(rowId, d.version);
        }
        const ym = `${d.year}-${String(d.month).padStart(2, '0')}`;
        let text = ` · ${ym}`;
        if (kind !== 'sales-data-deleted' && d.totalSales !== undefined) {
          text += ` · total ${nf2.format(num(d.totalSales))}`;
          if (Array.isArray(d.changedDays) && d.changedDays.length) {
            text += ` (${d.changedDays.length} day${d.changedDays.length === 1 ? '' : 's'} changed)`;
          }
        }
        addFeed('sales', SALES_VERBS[kind], [...storeParts(d.storeId), text], ts, id);
        if (ym === state.month) scheduleRefresh(d.storeId);
        if (Number(d.year) === analyticsYear() || Number(d.year) === analyticsYear() - 1) scheduleAnalytics();
        break;
      }
      case 'batch-completed': {
        const parts = [];
        for (const k of ['inserted', 'updated', 'deleted', 'failed']) {
          if (num(d[k]) > 0) parts.push(`${nf0.format(num(d[k]))} ${k}`);
        }
        addFeed('batch', 'Batch completed', parts.join(', ') || `${nf0.format(num(d.total))} records`, ts, id);
        break;
      }
      case 'store-created':
      case 'store-updated':
      case 'store-status-changed':
      case 'store-deleted': {
        const sid = Number(d.id);
        const known = state.stores.get(sid);
        if (known && known.version !== undefined && d.version !== undefined && known.version >= d.version) return;
        // Named before a removed store leaves the list (it said "store 21").
        const name = d.name ? nameParts(d.name, d.code) : storeParts(sid);
        if (kind === 'store-deleted') state.stores.delete(sid);
        else state.stores.set(sid, { ...(known || {}), ...d });
        renderStores(sid);
        if (kind === 'store-created') subscribeAll();
        // A name, code or region shows in the chart's labels, the region
        // totals and the region x month table; a removed store's figures go.
        const moved = kind === 'store-deleted' || (kind === 'store-updated'
          && (!known || ['name', 'code', 'region'].some((k) => d[k] !== undefined && d[k] !== known[k])));
        if (moved) {
          scheduleRefresh();
          scheduleAnalytics();
        }
        if (kind === 'store-status-changed') {
          addFeed('store', 'Store status', [...name, `: ${d.previousStatus || '?'} → ${d.status}`], ts, id);
        } else {
          addFeed('store', kind === 'store-created' ? 'Store opened' : kind === 'store-deleted' ? 'Store removed' : 'Store changed', name, ts, id);
        }
        break;
      }
      case 'system-announcement': {
        const level = d.level && d.level !== 'info' ? `[${d.level}] ` : '';
        addFeed('announcement', 'Announcement', level + (d.message || d.text || d.title || JSON.stringify(d)), ts, id);
        break;
      }
      case 'user-notification':
        addFeed('announcement', 'Notification', d.message || d.text || d.title || JSON.stringify(d), ts, id);
        break;
      case 'export-progress':
        exportProgress(d);
        break;
      case 'table-truncated':
        // Every row of that table went at once: whatever came from it is gone.
        addFeed('other', 'Table emptied', `every row of ${d.table || 'a table'} was removed`, ts, id);
        reloadAll();
        break;
      case 'user-created':
      case 'user-updated':
      case 'user-deleted':
      case 'session-revoked':
        addFeed('other', USER_VERBS[kind], userEventText(kind, d), ts, id);
        scheduleUsers();
        break;
      default:
        addFeed('other', kind, '', ts, id);
    }
  }

  // ---------- users (admins) ----------

  // Close codes of a revoked token (see docs/websocket.md).
  const WS_ENDED = {
    4010: 'Your account has been disabled.',
    4011: 'Your account has been deleted.',
    4013: 'Your password was changed; please sign in again.',
    4014: 'Your session has ended; please sign in again.',
  };

  const USER_VERBS = {
    'user-created': 'User added',
    'user-updated': 'User changed',
    'user-deleted': 'User deleted',
    'session-revoked': 'Session ended',
  };

  function isAdmin() {
    return !!(state.user && state.user.role === 'admin');
  }

  function userEventText(kind, d) {
    if (kind === 'session-revoked') return `user ${d.userId} (${d.reason || 'logout'})`;
    const what = Array.isArray(d.changed) && d.changed.length
      ? ` · ${d.changed.map((c) => (c === 'disabled' ? (d.disabled ? 'disabled' : 'enabled') : `${c} changed`)).join(', ')}`
      : '';
    return `${d.email || `user ${d.userId}`}${what}`;
  }

  function startUsers() {
    $('users-card').hidden = !isAdmin();
    // Exports are for admins and managers: staff would only get a 403.
    $('export-card').hidden = !(state.user && (state.user.role === 'admin' || state.user.role === 'manager'));
    if (isAdmin()) {
      loadUsers();
    } else if (state.users.length) {
      // No longer an admin (4012): the list goes.
      state.users = [];
      renderUsers();
    }
  }

  function scheduleUsers() {
    if (!isAdmin()) return;
    clearTimeout(state.usersTimer);
    state.usersTimer = setTimeout(loadUsers, REFRESH_DEBOUNCE_MS);
  }

  async function loadUsers() {
    if (!isAdmin()) return;
    const gen = state.sessionGen;
    try {
      const body = await api('/api/v2/users?limit=1000');
      if (gen !== state.sessionGen || !isAdmin()) return;
      state.users = body.data;
      renderUsers();
    } catch (e) {
      if (gen === state.sessionGen) $('user-error').textContent = `Users: ${e.message}`;
    }
  }

  function renderUsers() {
    const rows = state.users.map((u) => {
      const toggle = el('button', {
        type: 'button',
        class: 'btn btn-quiet',
        'data-action': u.disabled ? 'enable' : 'disable',
        'aria-label': `${u.disabled ? 'Enable' : 'Disable'} ${u.email}`,
      }, u.disabled ? 'Enable' : 'Disable');
      toggle.addEventListener('click', () => changeUser(u.id, { disabled: !u.disabled }));
      const del = el('button', { type: 'button', class: 'btn btn-quiet', 'data-action': 'delete', 'aria-label': `Delete ${u.email}` }, 'Delete');
      del.addEventListener('click', () => removeUser(u));
      return el('tr', { 'data-user-id': String(u.id), 'data-disabled': String(u.disabled) },
        el('td', {}, u.email),
        el('td', {}, u.role),
        el('td', {}, u.role === 'admin' ? 'all' : u.stores.join(', ')),
        el('td', {}, u.disabled ? 'disabled' : 'active'),
        el('td', { class: 'actions' }, toggle, del));
    });
    $('users').querySelector('tbody').replaceChildren(...rows);
    $('users-count').textContent = `(${state.users.length})`;
  }

  async function changeUser(id, patch) {
    $('user-error').textContent = '';
    try {
      await api(`/api/v2/users/${id}`, {
        method: 'PATCH',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(patch),
      });
      loadUsers();
    } catch (e) {
      $('user-error').textContent = e.message;
    }
  }

  async function removeUser(u) {
    if (!window.confirm(`Delete ${u.email}? Their sessions end at once.`)) return;
    $('user-error').textContent = '';
    try {
      await api(`/api/v2/users/${u.id}`, { method: 'DELETE', raw: true });
      loadUsers();
    } catch (e) {
      $('user-error').textContent = e.message;
    }
  }

  async function addUser(ev) {
    ev.preventDefault();
    const err = $('user-error');
    err.textContent = '';
    const stores = $('new-user-stores').value.split(/[\s,]+/).filter(Boolean).map(Number);
    if (stores.some((n) => !Number.isInteger(n) || n <= 0)) {
      err.textContent = 'Store ids are whole numbers, separated by commas.';
      $('new-user-stores').focus();
      return;
    }
    try {
      await api('/api/v2/users', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({
          email: $('new-user-email').value.trim(),
          role: $('new-user-role').value,
          stores,
          password: $('new-user-password').value,
        }),
      });
      $('user-form').reset();
      loadUsers();
    } catch (e) {
      err.textContent = e.message;
    }
  }

  // ---------- export ----------

  // export-progress events (at most two a second, and a final one with
  // done: true) drive the progress bar while the download runs.
  function exportProgress(d) {
    const job = state.exportJob;
    if (!job) return;
    if (job.id && d.exportId && String(d.exportId) !== String(job.id)) return;
    state.exportProgressEvents += 1;
    job.wsSeen = true;
    const pct = d.done ? 100 : Math.max(0, Math.min(100, num(d.percent)));
    const total = num(d.estimatedTotal);
    if (job.finished) {
      // The download already ended; the server's final word is added.
      if (d.done && d.status && d.status !== 'completed') {
        $('export-status').textContent += ` The server reports the export ${d.status}.`;
      }
      if (d.done) state.exportJob = null;
      return;
    }
    setExportBar(pct);
    $('export-status').textContent = d.done
      ? `Export ${d.status || 'finished'} on the server: ${nf0.format(num(d.rowsSent))} rows; saving…`
      : `Exporting: ${nf0.format(num(d.rowsSent))}${total ? ` of ~${nf0.format(total)}` : ''} rows (${Math.round(pct)}%)`;
  }

  function setExportBar(pct) {
    const bar = $('export-progress');
    bar.hidden = false;
    bar.value = pct;
    bar.setAttribute('aria-valuetext', `${Math.round(pct)}%`);
  }

  function filenameFrom(res, fallback) {
    const cd = res.headers.get('content-disposition') || '';
    const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(cd);
    try {
      return m ? decodeURIComponent(m[1]) : fallback;
    } catch (_) {
      return fallback;
    }
  }

  async function startExport() {
    if (state.exportJob && !state.exportJob.finished) return;
    const btn = $('export-btn');
    const status = $('export-status');
    const range = $('export-range').value;
    const params = new URLSearchParams({ format: 'csv' });
    if (range === 'month') {
      params.set('from', state.month);
      params.set('to', state.month);
    }
    const job = { id: null, wsSeen: false, finished: false };
    const gen = state.sessionGen;
    state.exportJob = job;
    btn.disabled = true;
    btn.setAttribute('aria-busy', 'true');
    setExportBar(0);
    status.textContent = 'Starting export…';
    try {
      const res = await api(`/api/v2/sales/export?${params}`, { raw: true, cache: 'no-store', headers: { Accept: 'text/csv' } });
      job.id = res.headers.get('x-export-id');
      const estimated = num(res.headers.get('x-export-estimated-rows'));
      const chunks = [];
      let bytes = 0;
      let lines = 0;
      if (res.body && res.body.getReader) {
        const reader = res.body.getReader();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          if (gen !== state.sessionGen) {
            reader.cancel().catch(() => {});
            return;
          }
          chunks.push(value);
          bytes += value.length;
          for (let i = 0; i < value.length; i++) if (value[i] === 10) lines++;
          if (!job.wsSeen) {
            // No progress event yet: show what has arrived.
            const rows = Math.max(0, lines - 1);
            if (estimated > 0) setExportBar(Math.min(99, (rows / estimated) * 100));
            status.textContent = `Downloading: ${nf0.format(rows)}${estimated ? ` of ~${nf0.format(estimated)}` : ''} rows (${compact.format(bytes)}B)`;
          }
        }
      } else {
        chunks.push(await res.arrayBuffer());
      }
      // Logged out meanwhile: the file is not the next user's to save.
      if (gen !== state.sessionGen) return;
      const blob = new Blob(chunks, { type: 'text/csv' });
      const name = filenameFrom(res, range === 'month' ? `sales-${state.month}.csv` : 'sales-all.csv');
      const url = URL.createObjectURL(blob);
      const a = el('a', { href: url, download: name, hidden: '' });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 30000);
      setExportBar(100);
      status.textContent = `Saved ${name} (${nf0.format(Math.max(0, lines - 1))} rows).`;
      job.finished = true;
      // Keep listening a little for the server's final progress event.
      setTimeout(() => { if (state.exportJob === job) state.exportJob = null; }, 5000);
    } catch (e) {
      if (gen !== state.sessionGen) return;
      if (e.status !== 401) status.textContent = `Export failed: ${e.message}`;
      $('export-progress').hidden = true;
      state.exportJob = null;
    } finally {
      btn.disabled = false;
      btn.removeAttribute('aria-busy');
    }
  }

  // ---------- wiring ----------

  let lockRelease = null; // holdRefreshLock's (tests)

  function init() {
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', () => logout('', { endSession: true }));
    $('reconnect-now').addEventListener('click', () => { state.attempt = 0; connect(); });
    $('month').addEventListener('change', (e) => {
      if (!/^\d{4}-\d{2}$/.test(e.target.value)) return;
      const month = e.target.value;
      if (month !== state.month) {
        const yearChanged = month.slice(0, 4) !== state.month.slice(0, 4);
        state.month = month;
        // The previous month's figures go at once: none is ever shown
        // under this month's name ("Loading…" until this month's arrive,
        // or why they could not be loaded, tried again until they are).
        state.summarySeq += 1;
        state.byStore = null;
        state.byRegion = null;
        state.summaryError = null;
        state.refreshFlash = new Set();
        renderChart();
        renderRegions();
        if (yearChanged) {
          state.analyticsSeq += 1;
          renderRegionMonths([], analyticsYear(), 'Loading…');
          renderYoy([], analyticsYear());
          yoyNote('Loading…');
        }
      }
      state.summaryFailures = 0;
      state.analyticsFailures = 0;
      loadSummaries();
      loadAnalytics();
    });
    $('top-n').addEventListener('change', (e) => {
      state.topN = Number(e.target.value) || 0;
      renderChart();
    });
    $('store-filter').addEventListener('input', () => renderStores());
    $('feed-clear').addEventListener('click', () => {
      $('feed').replaceChildren();
      $('feed-empty').hidden = false;
    });
    $('export-btn').addEventListener('click', startExport);
    $('user-form').addEventListener('submit', addUser);
    window.addEventListener('online', () => {
      if (state.token && !state.ws) { state.attempt = 0; connect(); }
    });
    let resizeTimer = null;
    let lastWidth = 0;
    const ro = new ResizeObserver(() => {
      const w = $('chart-wrap').clientWidth;
      if (w === lastWidth) return;
      lastWidth = w;
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => renderChart(), 100);
    });
    ro.observe($('chart-wrap'));

    // For tests and the curious: the live state, and a way to cut the socket.
    window.pgSalesDashboard = {
      state,
      dropConnection() {
        if (state.ws) state.ws.close(4999, 'dropped');
      },
      // Replaces the access token with one the server refuses (the page
      // must refresh its way back).
      spoilToken() {
        state.token = 'not.a.token';
      },
      // Handles `msg` as if the socket had brought it (for events no API
      // call can make, such as `table-truncated`).
      receive(msg) {
        handleMessage(msg);
      },
      // Refreshes the session now (as the timer or a 401 would); resolves
      // to 'ok' or to why it failed.
      refresh() {
        return refreshSession().then(() => 'ok', (e) => `failed: ${e.message}`);
      },
      // Pure pieces of logic, for the test.
      silenceAfterTick,
      silenceLimitMs: SILENCE_LIMIT_MS,
      tickMs: PING_EVERY_MS / 2,
      yoyCompare,
      retryPlan,
      // Takes the origin-wide refresh lock and keeps it until
      // releaseRefreshLock(): resolves once it is held (so a test can show
      // that logins and refreshes of every tab wait for it).
      holdRefreshLock() {
        return new Promise((held) => {
          withRefreshLock(() => new Promise((release) => {
            lockRelease = release;
            held('held');
          }));
        });
      },
      releaseRefreshLock() {
        if (lockRelease) lockRelease();
        lockRelease = null;
      },
      // How many requests wait for the refresh lock (in every tab).
      async refreshLockWaiters() {
        const q = await navigator.locks.query();
        return (q.pending || []).filter((l) => l.name === REFRESH_LOCK).length;
      },
    };

    if (channel) channel.onmessage = (e) => tokenAnnounced(e.data);

    const saved = loadSession();
    if (saved) {
      state.token = saved.token;
      state.cookieSession = saved.cookieSession === true;
      state.sessionId = typeof saved.sessionId === 'string' ? saved.sessionId : null;
      state.tokenExpiresAt = Number(saved.tokenExpiresAt) || 0;
      state.user = saved.user;
      scheduleTokenRefresh();
      start();
    } else {
      $('email').focus();
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
