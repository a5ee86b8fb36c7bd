// The browser softphone the integration tests drive: one JsSIP user agent set up from the URL query, whose
// state is shown on screen and exposed as window.softphone for the test driver (tests/browser/driver.py).
//
// Query: wss (WebSocket URL), uri (SIP AOR), user (digest user), password, name (display name), instance
// (a UUID sent as +sip.instance, so a reload replaces its own binding), expires, debug=1 (JsSIP log to the
// console), register=0 (connect without registering).
//
// Incoming calls are only exposed, never answered or rejected on their own: the test decides.
(() => {
  'use strict';

  const MAX_EVENTS = 500;
  const SHOWN_EVENTS = 16;
  const MAX_SIP = 200;
  const MEDIA_SAMPLE_MS = 500;
  // No STUN or TURN: the tests run on a closed network where a STUN server would only stall ICE gathering.
  const PC_CONFIG = { iceServers: [] };
  const MEDIA = { audio: true, video: false };

  const started = performance.now();
  const query = new URLSearchParams(window.location.search);
  const settings = {
    wss: query.get('wss') || '',
    uri: query.get('uri') || '',
    user: query.get('user') || '',
    password: query.get('password') || '',
    name: query.get('name') || '',
    instance: query.get('instance') || '',
    expires: Number(query.get('expires') || 0),
    debug: query.get('debug') === '1',
    register: query.get('register') !== '0',
  };

  const st = {
    jssipVersion: null,          // what the bundle says of itself
    jssipPackage: null,          // the npm release it came from (3.12.0's bundle calls itself 3.11.1)
    configError: null,
    connection: 'idle',          // idle | connecting | connected | disconnected
    connectionError: null,
    registered: false,
    registrationError: null,
    registrations: 0,            // how many times the registrar accepted us, refreshes included
    direction: null,             // incoming | outgoing, for the current or last call
    incoming: null,              // {from, uri, displayName} while an incoming call rings or is up
    outgoing: null,              // {target} for a call this page made
    ringing: false,
    inCall: false,
    ended: false,
    endCause: null,
    endOriginator: null,
    endStatus: null,             // the SIP status that ended it, when there was one
    calls: 0,
    remoteSdp: null,
    localSdp: null,
    media: null,                 // the current (or last) call's RTP counters, sampled every MEDIA_SAMPLE_MS
    events: [],
    sip: [],                     // first lines of every SIP message, '>' sent, '<' received
  };

  let ua = null;
  let session = null;

  const $ = (id) => document.getElementById(id);

  function stamp() {
    return ((performance.now() - started) / 1000).toFixed(3);
  }

  function log(type, detail = '') {
    st.events.push({ t: Number(stamp()), type, detail: String(detail) });
    if (st.events.length > MAX_EVENTS) st.events.shift();
    render();
  }

  function traceSip(dir, message) {
    const text = typeof message === 'string' ? message : String(message);
    const first = text.split('\r\n', 1)[0];
    st.sip.push(`${dir} ${first}`);
    if (st.sip.length > MAX_SIP) st.sip.shift();
    log('sip', `${dir} ${first}`);
  }

  function peerName(identity) {
    if (!identity) return 'unknown';
    const uri = identity.uri ? identity.uri.toString() : '';
    return identity.display_name ? `${identity.display_name} <${uri}>` : uri;
  }

  function setStatus(id, cls, text, detail) {
    const box = $(id);
    box.className = `status ${cls}`;
    box.textContent = text;
    if (detail) {
      const span = document.createElement('span');
      span.className = 'detail';
      span.textContent = detail;
      box.appendChild(span);
    }
  }

  function render() {
    if (!document.body) return;
    if (st.jssipVersion) {
      const pkg = st.jssipPackage && st.jssipPackage !== st.jssipVersion ? ` (npm jssip ${st.jssipPackage})` : '';
      $('version').textContent = `JsSIP ${st.jssipVersion}${pkg}`;
    }
    $('account').replaceChildren(...accountLines());

    if (st.configError) {
      setStatus('registration', 'bad', 'Not started', st.configError);
    } else if (st.registered) {
      setStatus('registration', 'ok', 'Registered', `as ${settings.uri}`);
    } else if (st.registrationError) {
      setStatus('registration', 'bad', 'Not registered', st.registrationError);
    } else if (st.connection === 'connecting') {
      setStatus('registration', 'busy', 'Connecting', settings.wss);
    } else if (st.connection === 'connected' && settings.register) {
      setStatus('registration', 'busy', 'Registering', settings.wss);
    } else if (st.connection === 'connected') {
      setStatus('registration', 'ok', 'Connected', 'not registering (register=0)');
    } else {
      setStatus('registration', '', 'Not registered', st.connectionError || '');
    }

    const peer = st.incoming ? st.incoming.from : (st.outgoing ? st.outgoing.target : '');
    const audio = st.media ? `audio: ${st.media.packetsSent} packets sent, ${st.media.packetsReceived} received`
      + ` (ICE ${st.media.iceConnectionState})` : '';
    if (st.inCall) {
      setStatus('call', 'ok', 'In call', [`with ${peer}`, audio].filter(Boolean).join(' · '));
    } else if (st.ended) {
      const by = st.endOriginator ? `ended by ${st.endOriginator}` : '';
      setStatus('call', 'bad', `Call ended (${st.endCause})`, [peer, by].filter(Boolean).join(', '));
    } else if (st.incoming) {
      setStatus('call', 'ring', `Incoming call from ${st.incoming.displayName || st.incoming.uri}`, st.incoming.uri);
    } else if (st.outgoing) {
      setStatus('call', 'ring', st.ringing ? 'Ringing' : 'Calling', st.outgoing.target);
    } else {
      setStatus('call', '', 'No call');
    }

    const items = st.events.slice(-SHOWN_EVENTS).map((e) => {
      const li = document.createElement('li');
      const time = document.createElement('span');
      time.className = 'time';
      time.textContent = e.t.toFixed(3).padStart(8);
      li.append(time, e.detail ? `${e.type}: ${e.detail}` : e.type);
      if (e.type === 'sip') li.className = 'sip';
      if (/fail|error/i.test(e.type)) li.className = 'error';
      return li;
    });
    $('log').replaceChildren(...items);
  }

  function accountLines() {
    const line = (label, value) => {
      const div = document.createElement('div');
      const b = document.createElement('b');
      b.textContent = value || '(not set)';
      div.append(`${label}: `, b);
      return div;
    };
    const who = settings.name ? `${settings.name} <${settings.uri}>` : settings.uri;
    return [line('Account', who), line('Server', settings.wss), line('Auth user', settings.user)];
  }

  // JsSIP's own WebSocket transport, with each SIP message's first line written to the event log, so a test that
  // fails shows what went over the wire (a 403 to REGISTER, a 478 from the edge) without a packet capture.
  function tracingSocket(url) {
    class TracingSocket extends window.JsSIP.WebSocketInterface {
      send(message) {
        traceSip('>', message);
        return super.send(message);
      }

      _onMessage(event) {
        traceSip('<', event.data);
        return super._onMessage(event);
      }
    }
    return new TracingSocket(url);
  }

  function endCall(cause, originator, message) {
    st.inCall = false;
    st.ringing = false;
    st.ended = true;
    st.endCause = cause || 'unknown';
    st.endOriginator = originator || null;
    st.endStatus = message && message.status_code ? message.status_code : null;
    session = null;
  }

  function playRemoteAudio(pc) {
    // What a real web phone does; the tests read RTP counters from getStats() rather than listen.
    pc.addEventListener('track', (event) => {
      const audio = $('remote-audio') || document.body.appendChild(Object.assign(
        document.createElement('audio'), { id: 'remote-audio', autoplay: true }));
      audio.srcObject = event.streams[0] || new MediaStream([event.track]);
      audio.play().catch(() => {});
    });
  }

  function watchSession(s) {
    s.on('peerconnection', (e) => {
      log('peerconnection');
      playRemoteAudio(e.peerconnection);
      const timer = setInterval(() => {
        if (s !== session) clearInterval(timer);
        else media().catch(() => {});
      }, MEDIA_SAMPLE_MS);
      e.peerconnection.addEventListener('iceconnectionstatechange', () => {
        log('ice', e.peerconnection.iceConnectionState);
      });
    });
    s.on('sdp', (e) => {
      if (e.originator === 'remote') st.remoteSdp = e.sdp;
      else st.localSdp = e.sdp;
      log('sdp', `${e.originator} ${e.type}`);
    });
    s.on('progress', (e) => {
      if (s.direction === 'outgoing') st.ringing = true;
      // An incoming call's progress is the 180 JsSIP sent on its own; an outgoing one's is the answer it got.
      log('progress', e.response ? `${e.response.status_code} ${e.response.reason_phrase}` : 'ringing');
    });
    s.on('accepted', () => log('accepted'));
    s.on('confirmed', () => {
      st.inCall = true;
      log('confirmed');
    });
    s.on('ended', (e) => {
      if (s !== session) return;
      endCall(e.cause, e.originator, e.message);
      log('ended', `${e.cause} (by ${e.originator})`);
    });
    s.on('failed', (e) => {
      if (s !== session) return;
      endCall(e.cause, e.originator, e.message);
      const status = e.message && e.message.status_code ? ` ${e.message.status_code}` : '';
      log('failed', `${e.cause}${status} (by ${e.originator})`);
    });
    s.on('getusermediafailed', (e) => log('getusermediafailed', e && e.name ? e.name : e));
    s.on('peerconnection:createofferfailed', (e) => log('createofferfailed', e));
    s.on('peerconnection:createanswerfailed', (e) => log('createanswerfailed', e));
    s.on('peerconnection:setlocaldescriptionfailed', (e) => log('setlocaldescriptionfailed', e));
    s.on('peerconnection:setremotedescriptionfailed', (e) => log('setremotedescriptionfailed', e));
  }

  function onNewSession(e) {
    const s = e.session;
    if (session && s !== session) {
      // One call at a time keeps the state a test reads unambiguous; a second call gets what a busy phone says.
      log('busy', `rejected a second call from ${peerName(s.remote_identity)}`);
      s.terminate({ status_code: 486, reason_phrase: 'Busy Here' });
      return;
    }
    session = s;
    st.calls += 1;
    st.direction = s.direction;
    st.inCall = false;
    st.ringing = false;
    st.ended = false;
    st.endCause = null;
    st.endOriginator = null;
    st.endStatus = null;
    st.remoteSdp = null;
    st.localSdp = null;
    st.media = null;
    if (s.direction === 'incoming') {
      const id = s.remote_identity;
      st.incoming = {
        from: peerName(id),
        uri: id && id.uri ? id.uri.toString() : '',
        displayName: id && id.display_name ? id.display_name : '',
      };
      st.outgoing = null;
      watchSession(s);
      // JsSIP has already parsed the offer; keeping it lets a test check what the edge turned it into.
      if (e.request && e.request.body) st.remoteSdp = e.request.body;
      log('incoming', st.incoming.from);
    } else {
      st.incoming = null;
      watchSession(s);
      log('outgoing', st.outgoing ? st.outgoing.target : '');
    }
  }

  function start() {
    if (!window.JsSIP) {
      st.configError = 'JsSIP not loaded: run npm ci in tests/browser';
      log('error', st.configError);
      return;
    }
    st.jssipVersion = window.JsSIP.version;
    if (settings.debug) window.JsSIP.debug.enable('JsSIP:*');
    else window.JsSIP.debug.disable('JsSIP:*');
    log('loaded', `JsSIP ${st.jssipVersion}`);
    fetch('node_modules/jssip/package.json')
      .then((r) => r.json())
      .then((pkg) => { st.jssipPackage = pkg.version; render(); })
      .catch(() => {});

    if (!settings.wss || !settings.uri) {
      st.configError = 'missing settings: give wss and uri in the page URL';
      log('error', st.configError);
      return;
    }
    const config = {
      sockets: [tracingSocket(settings.wss)],
      uri: settings.uri,
      password: settings.password || undefined,
      authorization_user: settings.user || undefined,
      display_name: settings.name || undefined,
      register: settings.register,
      // The router does not take part in session timers; a re-INVITE or UPDATE every few minutes would only be
      // one more thing for a short test to get wrong.
      session_timers: false,
      user_agent: `JsSIP ${st.jssipVersion} (sip-router test softphone)`,
    };
    if (settings.instance) config.instance_id = settings.instance;
    if (settings.expires > 0) config.register_expires = settings.expires;
    try {
      ua = new window.JsSIP.UA(config);
    } catch (err) {
      st.configError = `configuration error: ${err.parameter || ''} ${err.message || err}`.trim();
      log('error', st.configError);
      return;
    }
    ua.on('connecting', () => {
      st.connection = 'connecting';
      log('connecting', settings.wss);
    });
    ua.on('connected', () => {
      st.connection = 'connected';
      st.connectionError = null;
      log('connected');
    });
    ua.on('disconnected', (e) => {
      st.connection = 'disconnected';
      if (e && e.error) {
        // The browser says no more than "closed with 1006" for a refused port, a bad certificate or a dead edge.
        st.connectionError = `Connection Error: WebSocket closed (code ${e.code || 'none'}${e.reason ? `, ${e.reason}` : ''})`;
        if (!st.registered) st.registrationError = st.connectionError;
      }
      log(e && e.error ? 'connection failed' : 'disconnected', st.connectionError || '');
    });
    ua.on('registered', (e) => {
      st.registered = true;
      st.registrationError = null;
      st.registrations += 1;
      log('registered', e.response ? `${e.response.status_code} ${e.response.reason_phrase}` : '');
    });
    ua.on('unregistered', (e) => {
      st.registered = false;
      log('unregistered', e && e.cause ? e.cause : '');
    });
    ua.on('registrationFailed', (e) => {
      st.registered = false;
      const status = e.response ? ` (${e.response.status_code} ${e.response.reason_phrase})` : '';
      st.registrationError = `${e.cause}${status}`;
      log('registration failed', st.registrationError);
    });
    ua.on('newRTCSession', onNewSession);
    ua.start();
  }

  function need(what) {
    if (!ua) throw new Error(`softphone not started: ${st.configError || 'no user agent'}`);
    if (what === 'session' && !session) throw new Error('no call in progress');
  }

  // RTP counters of the current call from getStats(), kept in st.media; once the call has ended (and JsSIP has
  // closed its peer connection) the last sample stands, so a test can still read what flowed.
  async function media() {
    const pc = session && session.connection;
    if (!pc || pc.connectionState === 'closed') {
      return st.media || { iceConnectionState: null, connectionState: null, packetsReceived: 0, bytesReceived: 0,
                           packetsSent: 0, bytesSent: 0 };
    }
    const out = { iceConnectionState: pc.iceConnectionState, connectionState: pc.connectionState,
                  packetsReceived: 0, bytesReceived: 0, packetsSent: 0, bytesSent: 0 };
    const report = await pc.getStats();
    report.forEach((r) => {
      if (r.kind !== 'audio') return;
      if (r.type === 'inbound-rtp') {
        out.packetsReceived += r.packetsReceived || 0;
        out.bytesReceived += r.bytesReceived || 0;
      } else if (r.type === 'outbound-rtp') {
        out.packetsSent += r.packetsSent || 0;
        out.bytesSent += r.bytesSent || 0;
      }
    });
    if (session && session.connection === pc) {
      const changed = !st.media || st.media.packetsSent !== out.packetsSent
        || st.media.packetsReceived !== out.packetsReceived || st.media.iceConnectionState !== out.iceConnectionState;
      st.media = out;
      if (changed) render();
    }
    return out;
  }

  window.softphone = {
    settings: () => ({ ...settings, password: settings.password ? '***' : '' }),
    state: () => JSON.parse(JSON.stringify(st)),
    media,
    answer() {
      need('session');
      if (session.direction !== 'incoming') throw new Error('the call in progress is not an incoming call');
      log('answer');
      session.answer({ mediaConstraints: MEDIA, pcConfig: PC_CONFIG });
    },
    hangup() {
      need('session');
      log('hangup');
      session.terminate();
    },
    call(target) {
      need();
      if (session) throw new Error('a call is already in progress');
      st.outgoing = { target: String(target) };
      log('call', target);
      ua.call(String(target), { mediaConstraints: MEDIA, pcConfig: PC_CONFIG });
    },
    unregister() {
      need();
      log('unregister');
      ua.unregister();
    },
    stop() {
      need();
      log('stop');
      // JsSIP unregisters first when registered, then closes the WebSocket.
      ua.stop();
    },
  };

  document.addEventListener('DOMContentLoaded', render);
  start();
})();
