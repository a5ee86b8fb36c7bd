"""The running router's control socket (``sip-router status``, ``calls --live``,
``unregister``, ``reload``): ``server`` speaks the protocol on its own thread,
``views`` builds the answers on the PJSIP thread."""
