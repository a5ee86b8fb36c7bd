// The agent page's softphone: the page registers over WSS (through the edge) as the agent's
// `web` device, shows an incoming call with the caller and the queue, and answers or declines
// it with WebRTC audio.  Its settings (WSS URL, AOR, digest user, realm and MD5 HA1 -- never the
// SIP password) come from /api/me/softphone over the agent's own session.
//
// The panel is <section id="softphone" data-settings-url="..."> with children #sp-status,
// #sp-call, #sp-answer, #sp-decline, #sp-hangup and <audio id="sp-audio">.  Texts come from
// data-text-* attributes on the section, so the page's language applies.  window.agentPhone
// exposes the state for tests.
(() => {
  'use strict';

  const panel = document.getElementById('softphone');
  if (!panel) return;
  const $ = (id) => document.getElementById(id);
  const text = (name, fallback) => panel.dataset[`text${name}`] || fallback;
  const st = { registered: false, error: null, ringing: false, inCall: false, ended: false,
               caller: null, queue: null, endCause: null, events: [] };
  let session = null;

  function log(what) {
    st.events.push(what);
    if (st.events.length > 100) st.events.shift();
  }

  function show() {
    const status = $('sp-status');
    if (st.error) status.textContent = `${text('Unavailable', 'Softphone unavailable')}: ${st.error}`;
    else status.textContent = st.registered ? text('Ready', 'Ready: calls ring here')
                                            : text('Connecting', 'Connecting…');
    panel.dataset.state = st.inCall ? 'in-call' : st.ringing ? 'ringing' : st.registered ? 'ready' : 'idle';
    const call = $('sp-call');
    if (st.ringing || st.inCall) {
      const queue = st.queue ? ` · ${text('Queue', 'queue')} ${st.queue}` : '';
      call.textContent = `${st.inCall ? text('InCall', 'In call with') : text('Incoming', 'Incoming call from')} `
        + `${st.caller}${queue}`;
    } else {
      call.textContent = st.ended ? `${text('Ended', 'Call ended')} (${st.endCause})` : '';
    }
    $('sp-answer').hidden = !st.ringing;
    $('sp-decline').hidden = !st.ringing;
    $('sp-hangup').hidden = !st.inCall;
  }

  function callerOf(request) {
    const from = request.from;
    const name = from.display_name ? `${from.display_name} ` : '';
    return `${name}<${from.uri.user || from.uri.toString()}>`;
  }

  function attachAudio(rtc) {
    const pc = rtc.connection;
    if (!pc) return;
    pc.addEventListener('track', (event) => {
      const audio = $('sp-audio');
      if (audio && event.streams[0]) audio.srcObject = event.streams[0];
    });
  }

  function onSession(event) {
    const rtc = event.session;
    if (event.originator !== 'remote') return;
    if (session) {                       // one call at a time: a second one is busy
      rtc.terminate({ status_code: 486, reason_phrase: 'Busy Here' });
      return;
    }
    session = rtc;
    Object.assign(st, { ringing: true, inCall: false, ended: false, endCause: null,
                        caller: callerOf(event.request), queue: event.request.getHeader('X-Queue') || null });
    log(`incoming ${st.caller}`);
    rtc.on('peerconnection', () => attachAudio(rtc));
    rtc.on('confirmed', () => { Object.assign(st, { ringing: false, inCall: true }); log('confirmed'); show(); });
    const finish = (e) => {
      Object.assign(st, { ringing: false, inCall: false, ended: true, endCause: e.cause });
      session = null;
      log(`ended ${e.cause}`);
      show();
    };
    rtc.on('ended', finish);
    rtc.on('failed', finish);
    show();
  }

  async function start() {
    if (!window.JsSIP) {
      st.error = text('NoJssip', 'JsSIP is not installed on the server');
      show();
      return;
    }
    let settings;
    try {
      const reply = await fetch(panel.dataset.settingsUrl, { credentials: 'same-origin' });
      if (!reply.ok) throw new Error(`${reply.status}`);
      settings = await reply.json();
    } catch (error) {
      st.error = 'no web device, or no edge with WSS';   // nothing to register: the panel is hidden
      panel.hidden = true;
      return;
    }
    const socket = new window.JsSIP.WebSocketInterface(settings.wss_url);
    const ua = new window.JsSIP.UA({
      sockets: [socket], uri: settings.uri, authorization_user: settings.auth_user,
      realm: settings.realm, ha1: settings.ha1, display_name: settings.display_name,
      instance_id: settings.instance.replace('urn:uuid:', ''), session_timers: false,
      register: true, user_agent: 'JsSIP sip-router agent page',
    });
    ua.on('registered', () => { st.registered = true; st.error = null; log('registered'); show(); });
    ua.on('unregistered', () => { st.registered = false; show(); });
    ua.on('registrationFailed', (e) => { st.registered = false; st.error = e.cause; log(`failed ${e.cause}`); show(); });
    ua.on('disconnected', () => { st.registered = false; show(); });
    ua.on('newRTCSession', onSession);
    ua.start();
    window.addEventListener('beforeunload', () => ua.stop());
    show();
  }

  const options = { mediaConstraints: { audio: true, video: false }, pcConfig: { iceServers: [] } };
  $('sp-answer').addEventListener('click', () => session && session.answer(options));
  $('sp-decline').addEventListener('click', () => session && session.terminate({ status_code: 603, reason_phrase: 'Decline' }));
  $('sp-hangup').addEventListener('click', () => session && session.terminate());
  window.agentPhone = { state: () => JSON.parse(JSON.stringify(st)) };
  start();
})();
