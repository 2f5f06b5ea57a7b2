# ruff: noqa: E501, W291 - the ssh -v transcripts below are verbatim (long lines, and sshd's empty method list ends in a space)
"""Parsing of ``ssh -v`` output and the files the contract check gives ssh.

The transcripts are captured verbatim from OpenSSH_9.2p1 Debian-2+deb12u10 (Debian 12)
run with the command line :func:`appliance.lifecycle.contract.ssh_command` builds, given
only public key files (mode 0600), against ``sshd`` 9.2 in a network namespace:
PasswordAuthentication / KbdInteractiveAuthentication / PubkeyAuthentication /
MaxAuthTries varied, a wrong known_hosts, nothing listening, an address nobody answers
and a listener that never sends a banner. ``LOGGED_IN`` is a real login with the private
key, for the "Authenticated to" line.
"""

from __future__ import annotations

import pytest

from appliance.lifecycle import contract
from appliance.lifecycle.contract import (
    PublicKey,
    SshClientMissing,
    check_contract,
    known_hosts,
    parse_public_key,
    parse_ssh_verbose,
    ssh_command,
)

# Keys from ssh-keygen, with the fingerprints ``ssh-keygen -lf`` printed for them.
OP1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB2Dr6NC52+y5wWPCaYxKDc7d0pf1+feGsnhSJgKR2f1 op1@x"
OP1_FP = "SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw"
OP2 = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBP799lXldCNq5Am325DLBAJu4q/Mr6vFyT7ypBn8d3RU3M30DF7y04FnGgXUh+NhDVJbKL5k+//inxvuEBJs4tA= op2@x")
OP2_FP = "SHA256:a/GVyZ+a3w3sLXN/MgtH4VVU/Ct2H0P1cnivHkB3BwU"
R1_FP = "SHA256:sQ34hrltwpIaaeGzmmOi8Pp0rMf2lhzdEN0Izu7wZE0"
R2_FP = "SHA256:Fy/bWvbVqzMLCZgC7IvpTp2aS1mqmJURKknAqqS4b8I"
HOST_ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIyAkm4E4+UlUmPW1O50OcJSIFYZW/JtvAkUtucFgtbr host"
HOST_ED_FP = "SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M"
HOST_RSA = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7zp6atfqhviRGsQ1F5WLPw0JPP0nDflJ9K2xLK9PgVcOeRg9mz54NfqEBjbcHkdVCNvkyb/tQdkhUZEwntWzrfJHTobh+SLnwRE9Aljil70Hsy7aErft3ZdmPpVS2frnCWANofY1OJtdZhJFE7ItAocO+vYkvXK26YcznlwmWEnHWZRe/MTAKthDGNDh9BZSj345MIGDlxZoo+1KazEeX5REgJYSgIH1/Wp/tQryJw1gF8tE6W7bp4fbT0ZLdrfYyAgzy+oRVZcFvZOdCNPee2lj4+mj5SdYe6rJoRA0MjpRd7HqOB+EvsQZTLlvT6nizvDqODSHzqeyDEzN/q0b9 host")
HOST_RSA_FP = "SHA256:ryoGZ2LWXHisOOfZb2rT3ziO7c5VXASpLhsXg3I7DBg"


# -- captured ssh -v transcripts --------------------------------------------------------------

ACCEPTED_AND_REFUSED = """\
OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.22 25 Aug 2026
debug1: Reading configuration data /dev/null
debug1: Connecting to 10.250.70.2 [10.250.70.2] port 2222.
debug1: fd 3 clearing O_NONBLOCK
debug1: Connection established.
debug1: identity file /tmp/exp/capw/k0 type 3
debug1: identity file /tmp/exp/capw/k0-cert type -1
debug1: identity file /tmp/exp/capw/k1 type 2
debug1: identity file /tmp/exp/capw/k1-cert type -1
debug1: Local version string SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10
debug1: Remote protocol version 2.0, remote software version OpenSSH_9.2p1 Debian-2+deb12u10
debug1: compat_banner: match: OpenSSH_9.2p1 Debian-2+deb12u10 pat OpenSSH* compat 0x04000000
debug1: Authenticating to 10.250.70.2:2222 as 'root'
debug1: SSH2_MSG_KEXINIT sent
debug1: SSH2_MSG_KEXINIT received
debug1: kex: algorithm: sntrup761x25519-sha512
debug1: kex: host key algorithm: ssh-ed25519
debug1: kex: server->client cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none
debug1: kex: client->server cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none
debug1: expecting SSH2_MSG_KEX_ECDH_REPLY
debug1: SSH2_MSG_KEX_ECDH_REPLY received
debug1: Server host key: ssh-ed25519 SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M
debug1: Host '[10.250.70.2]:2222' is known and matches the ED25519 host key.
debug1: Found key in /tmp/exp/kh:1
debug1: ssh_packet_send2_wrapped: resetting send seqnr 3
debug1: rekey out after 134217728 blocks
debug1: SSH2_MSG_NEWKEYS sent
debug1: expecting SSH2_MSG_NEWKEYS
debug1: ssh_packet_read_poll2: resetting read seqnr 3
debug1: SSH2_MSG_NEWKEYS received
debug1: rekey in after 134217728 blocks
debug1: Will attempt key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: Will attempt key: /tmp/exp/capw/k1 ECDSA SHA256:a/GVyZ+a3w3sLXN/MgtH4VVU/Ct2H0P1cnivHkB3BwU explicit
debug1: SSH2_MSG_EXT_INFO received
debug1: kex_input_ext_info: server-sig-algs=<ssh-ed25519,sk-ssh-ed25519@openssh.com,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,sk-ecdsa-sha2-nistp256@openssh.com,webauthn-sk-ecdsa-sha2-nistp256@openssh.com,ssh-dss,ssh-rsa,rsa-sha2-256,rsa-sha2-512>
debug1: kex_input_ext_info: publickey-hostbound@openssh.com=<0>
debug1: SSH2_MSG_SERVICE_ACCEPT received
debug1: Authentications that can continue: publickey
debug1: Next authentication method: publickey
debug1: Offering public key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: Server accepts key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
Load key "/tmp/exp/capw/k0": error in libcrypto
debug1: Offering public key: /tmp/exp/capw/k1 ECDSA SHA256:a/GVyZ+a3w3sLXN/MgtH4VVU/Ct2H0P1cnivHkB3BwU explicit
debug1: Authentications that can continue: publickey
debug1: No more authentication methods to try.
root@10.250.70.2: Permission denied (publickey).
"""


HOST_KEY_CHANGED = """\
OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.22 25 Aug 2026
debug1: Reading configuration data /dev/null
debug1: Connecting to 10.250.70.2 [10.250.70.2] port 2222.
debug1: fd 3 clearing O_NONBLOCK
debug1: Connection established.
debug1: identity file /tmp/exp/capw/k0 type 3
debug1: identity file /tmp/exp/capw/k0-cert type -1
debug1: Local version string SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10
debug1: Remote protocol version 2.0, remote software version OpenSSH_9.2p1 Debian-2+deb12u10
debug1: compat_banner: match: OpenSSH_9.2p1 Debian-2+deb12u10 pat OpenSSH* compat 0x04000000
debug1: Authenticating to 10.250.70.2:2222 as 'root'
debug1: SSH2_MSG_KEXINIT sent
debug1: SSH2_MSG_KEXINIT received
debug1: kex: algorithm: sntrup761x25519-sha512
debug1: kex: host key algorithm: ssh-ed25519
debug1: kex: server->client cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none
debug1: kex: client->server cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none
debug1: expecting SSH2_MSG_KEX_ECDH_REPLY
debug1: SSH2_MSG_KEX_ECDH_REPLY received
debug1: Server host key: ssh-ed25519 SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M.
Please contact your system administrator.
Add correct host key in /tmp/exp/kh_bad to get rid of this message.
Offending ED25519 key in /tmp/exp/kh_bad:1
  remove with:
  ssh-keygen -f "/tmp/exp/kh_bad" -R "[10.250.70.2]:2222"
Host key for [10.250.70.2]:2222 has changed and you have requested strict checking.
Host key verification failed.
"""


MAX_AUTH_TRIES = """\
OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.22 25 Aug 2026
debug1: Reading configuration data /dev/null
debug1: Connecting to 10.250.70.2 [10.250.70.2] port 2226.
debug1: fd 3 clearing O_NONBLOCK
debug1: Connection established.
debug1: identity file /tmp/exp/capw/m0 type 3
debug1: identity file /tmp/exp/capw/m0-cert type -1
debug1: identity file /tmp/exp/capw/m1 type 3
debug1: identity file /tmp/exp/capw/m1-cert type -1
debug1: identity file /tmp/exp/capw/m2 type 3
debug1: identity file /tmp/exp/capw/m2-cert type -1
debug1: identity file /tmp/exp/capw/m3 type 3
debug1: identity file /tmp/exp/capw/m3-cert type -1
debug1: Local version string SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10
debug1: Remote protocol version 2.0, remote software version OpenSSH_9.2p1 Debian-2+deb12u10
debug1: compat_banner: match: OpenSSH_9.2p1 Debian-2+deb12u10 pat OpenSSH* compat 0x04000000
debug1: Authenticating to 10.250.70.2:2226 as 'root'
debug1: SSH2_MSG_KEXINIT sent
debug1: SSH2_MSG_KEXINIT received
debug1: kex: algorithm: sntrup761x25519-sha512
debug1: kex: host key algorithm: ssh-ed25519
debug1: kex: server->client cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none
debug1: kex: client->server cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none
debug1: expecting SSH2_MSG_KEX_ECDH_REPLY
debug1: SSH2_MSG_KEX_ECDH_REPLY received
debug1: Server host key: ssh-ed25519 SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M
debug1: Host '[10.250.70.2]:2226' is known and matches the ED25519 host key.
debug1: Found key in /tmp/exp/kh:5
debug1: ssh_packet_send2_wrapped: resetting send seqnr 3
debug1: rekey out after 134217728 blocks
debug1: SSH2_MSG_NEWKEYS sent
debug1: expecting SSH2_MSG_NEWKEYS
debug1: ssh_packet_read_poll2: resetting read seqnr 3
debug1: SSH2_MSG_NEWKEYS received
debug1: rekey in after 134217728 blocks
debug1: Will attempt key: /tmp/exp/capw/m0 ED25519 SHA256:sQ34hrltwpIaaeGzmmOi8Pp0rMf2lhzdEN0Izu7wZE0 explicit
debug1: Will attempt key: /tmp/exp/capw/m1 ED25519 SHA256:Fy/bWvbVqzMLCZgC7IvpTp2aS1mqmJURKknAqqS4b8I explicit
debug1: Will attempt key: /tmp/exp/capw/m2 ED25519 SHA256:R0TnOJJWMz2E+4cu7MR7vjMJVGM0+aMuMQYZ707Rsvc explicit
debug1: Will attempt key: /tmp/exp/capw/m3 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: SSH2_MSG_EXT_INFO received
debug1: kex_input_ext_info: server-sig-algs=<ssh-ed25519,sk-ssh-ed25519@openssh.com,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,sk-ecdsa-sha2-nistp256@openssh.com,webauthn-sk-ecdsa-sha2-nistp256@openssh.com,ssh-dss,ssh-rsa,rsa-sha2-256,rsa-sha2-512>
debug1: kex_input_ext_info: publickey-hostbound@openssh.com=<0>
debug1: SSH2_MSG_SERVICE_ACCEPT received
debug1: Authentications that can continue: publickey
debug1: Next authentication method: publickey
debug1: Offering public key: /tmp/exp/capw/m0 ED25519 SHA256:sQ34hrltwpIaaeGzmmOi8Pp0rMf2lhzdEN0Izu7wZE0 explicit
debug1: Authentications that can continue: publickey
debug1: Offering public key: /tmp/exp/capw/m1 ED25519 SHA256:Fy/bWvbVqzMLCZgC7IvpTp2aS1mqmJURKknAqqS4b8I explicit
Received disconnect from 10.250.70.2 port 2226:2: Too many authentication failures
Disconnected from 10.250.70.2 port 2226
"""


PASSWORD_ON = """\
debug1: Server host key: ssh-ed25519 SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M
debug1: Host '[10.250.70.2]:2223' is known and matches the ED25519 host key.
debug1: Found key in /tmp/exp/kh:2
debug1: ssh_packet_send2_wrapped: resetting send seqnr 3
debug1: rekey out after 134217728 blocks
debug1: SSH2_MSG_NEWKEYS sent
debug1: expecting SSH2_MSG_NEWKEYS
debug1: ssh_packet_read_poll2: resetting read seqnr 3
debug1: SSH2_MSG_NEWKEYS received
debug1: rekey in after 134217728 blocks
debug1: Will attempt key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: SSH2_MSG_EXT_INFO received
debug1: kex_input_ext_info: server-sig-algs=<ssh-ed25519,sk-ssh-ed25519@openssh.com,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,sk-ecdsa-sha2-nistp256@openssh.com,webauthn-sk-ecdsa-sha2-nistp256@openssh.com,ssh-dss,ssh-rsa,rsa-sha2-256,rsa-sha2-512>
debug1: kex_input_ext_info: publickey-hostbound@openssh.com=<0>
debug1: SSH2_MSG_SERVICE_ACCEPT received
debug1: Authentications that can continue: publickey,password
debug1: Next authentication method: publickey
debug1: Offering public key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: Server accepts key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
Load key "/tmp/exp/capw/k0": error in libcrypto
debug1: No more authentication methods to try.
root@10.250.70.2: Permission denied (publickey,password).
"""


KBD_INTERACTIVE_ON = """\
debug1: Server host key: ssh-ed25519 SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M
debug1: Host '[10.250.70.2]:2224' is known and matches the ED25519 host key.
debug1: Found key in /tmp/exp/kh:3
debug1: ssh_packet_send2_wrapped: resetting send seqnr 3
debug1: rekey out after 134217728 blocks
debug1: SSH2_MSG_NEWKEYS sent
debug1: expecting SSH2_MSG_NEWKEYS
debug1: ssh_packet_read_poll2: resetting read seqnr 3
debug1: SSH2_MSG_NEWKEYS received
debug1: rekey in after 134217728 blocks
debug1: Will attempt key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: SSH2_MSG_EXT_INFO received
debug1: kex_input_ext_info: server-sig-algs=<ssh-ed25519,sk-ssh-ed25519@openssh.com,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,sk-ecdsa-sha2-nistp256@openssh.com,webauthn-sk-ecdsa-sha2-nistp256@openssh.com,ssh-dss,ssh-rsa,rsa-sha2-256,rsa-sha2-512>
debug1: kex_input_ext_info: publickey-hostbound@openssh.com=<0>
debug1: SSH2_MSG_SERVICE_ACCEPT received
debug1: Authentications that can continue: publickey,keyboard-interactive
debug1: Next authentication method: publickey
debug1: Offering public key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: Server accepts key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
Load key "/tmp/exp/capw/k0": error in libcrypto
debug1: No more authentication methods to try.
root@10.250.70.2: Permission denied (publickey,keyboard-interactive).
"""


PUBKEY_OFF = """\
debug1: Server host key: ssh-ed25519 SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M
debug1: Host '[10.250.70.2]:2227' is known and matches the ED25519 host key.
debug1: Found key in /tmp/exp/kh:9
debug1: ssh_packet_send2_wrapped: resetting send seqnr 3
debug1: rekey out after 134217728 blocks
debug1: SSH2_MSG_NEWKEYS sent
debug1: expecting SSH2_MSG_NEWKEYS
debug1: ssh_packet_read_poll2: resetting read seqnr 3
debug1: SSH2_MSG_NEWKEYS received
debug1: rekey in after 134217728 blocks
debug1: Will attempt key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: SSH2_MSG_EXT_INFO received
debug1: kex_input_ext_info: server-sig-algs=<ssh-ed25519,sk-ssh-ed25519@openssh.com,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,sk-ecdsa-sha2-nistp256@openssh.com,webauthn-sk-ecdsa-sha2-nistp256@openssh.com,ssh-dss,ssh-rsa,rsa-sha2-256,rsa-sha2-512>
debug1: kex_input_ext_info: publickey-hostbound@openssh.com=<0>
debug1: SSH2_MSG_SERVICE_ACCEPT received
debug1: Authentications that can continue: 
debug1: Next authentication method: publickey
debug1: Offering public key: /tmp/exp/capw/k0 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: Authentications that can continue: 
debug1: No more authentication methods to try.
root@10.250.70.2: Permission denied ().
"""


CONNECTION_REFUSED = """\
OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.22 25 Aug 2026
debug1: Reading configuration data /dev/null
debug1: Connecting to 10.250.70.2 [10.250.70.2] port 2299.
debug1: connect to address 10.250.70.2 port 2299: Connection refused
ssh: connect to host 10.250.70.2 port 2299: Connection refused
"""


CONNECT_TIMED_OUT = """\
OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.22 25 Aug 2026
debug1: Reading configuration data /dev/null
debug1: Connecting to 10.250.70.9 [10.250.70.9] port 22.
debug1: connect to address 10.250.70.9 port 22: Connection timed out
ssh: connect to host 10.250.70.9 port 22: Connection timed out
"""


BANNER_TIMED_OUT = """\
OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.22 25 Aug 2026
debug1: Reading configuration data /dev/null
debug1: Connecting to 10.250.70.2 [10.250.70.2] port 2232.
debug1: fd 3 clearing O_NONBLOCK
debug1: Connection established.
debug1: identity file /tmp/exp/capw/k0 type 3
debug1: identity file /tmp/exp/capw/k0-cert type -1
debug1: Local version string SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10
Connection timed out during banner exchange
Connection to 10.250.70.2 port 2232 timed out
"""


NO_HOST_KEY_KNOWN = """\
debug1: Server host key: ssh-ed25519 SHA256:RBRqSzU/ZWlZL8um4uZVVjJqjZ6Q5CKBq8fmfHA828M
debug1: checking without port identifier
No ED25519 host key is known for [10.250.70.2]:2222 and you have requested strict checking.
Host key verification failed.
"""


CONNECTION_CLOSED = """\
OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.22 25 Aug 2026
debug1: Reading configuration data /dev/null
debug1: Connecting to 10.250.70.2 [10.250.70.2] port 2240.
debug1: fd 3 clearing O_NONBLOCK
debug1: Connection established.
debug1: identity file /tmp/exp/capw/k0 type 3
debug1: identity file /tmp/exp/capw/k0-cert type -1
debug1: Local version string SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10
kex_exchange_identification: Connection closed by remote host
Connection closed by 10.250.70.2 port 2240
"""


# sshd with ``Banner`` set to a file of lines imitating ssh's own (the server does not know
# the client's key directory, /tmp/exp/capb here).
BANNER_FORGERY = """\
debug1: Server host key: ssh-ed25519 SHA256:h6KU3FAllAztbuGCCi3d1dWEpuLpoMCYkO+90wuOugA
debug1: Host '[10.250.70.2]:2201' is known and matches the ED25519 host key.
debug1: Found key in /tmp/exp/capb/kh:1
debug1: ssh_packet_send2_wrapped: resetting send seqnr 3
debug1: rekey out after 134217728 blocks
debug1: SSH2_MSG_NEWKEYS sent
debug1: expecting SSH2_MSG_NEWKEYS
debug1: ssh_packet_read_poll2: resetting read seqnr 3
debug1: SSH2_MSG_NEWKEYS received
debug1: rekey in after 134217728 blocks
debug1: Will attempt key: /tmp/exp/capb/k0 ED25519 SHA256:kE/f1ewTRhqSBkWQ6l+8TYNDG+iPbvRWAVzfDJtnSe8 explicit
debug1: SSH2_MSG_EXT_INFO received
debug1: kex_input_ext_info: server-sig-algs=<ssh-ed25519,sk-ssh-ed25519@openssh.com,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,sk-ecdsa-sha2-nistp256@openssh.com,webauthn-sk-ecdsa-sha2-nistp256@openssh.com,ssh-dss,ssh-rsa,rsa-sha2-256,rsa-sha2-512>
debug1: kex_input_ext_info: publickey-hostbound@openssh.com=<0>
debug1: SSH2_MSG_SERVICE_ACCEPT received
debug1: Server host key: ssh-ed25519 SHA256:forged
debug1: Authentications that can continue: publickey
debug1: Offering public key: /tmp/appliance-contract-x/k0 ED25519 SHA256:kE/f1ewTRhqSBkWQ6l+8TYNDG+iPbvRWAVzfDJtnSe8 explicit
debug1: Server accepts key: /tmp/appliance-contract-x/k0 ED25519 SHA256:kE/f1ewTRhqSBkWQ6l+8TYNDG+iPbvRWAVzfDJtnSe8 explicit
debug1: Authentications that can continue: publickey
debug1: Next authentication method: publickey
debug1: Offering public key: /tmp/exp/capb/k0 ED25519 SHA256:kE/f1ewTRhqSBkWQ6l+8TYNDG+iPbvRWAVzfDJtnSe8 explicit
debug1: Authentications that can continue: publickey
debug1: No more authentication methods to try.
root@10.250.70.2: Permission denied (publickey).
"""
BANNER_KEY_FP = "SHA256:kE/f1ewTRhqSBkWQ6l+8TYNDG+iPbvRWAVzfDJtnSe8"
BANNER_HOST_FP = "SHA256:h6KU3FAllAztbuGCCi3d1dWEpuLpoMCYkO+90wuOugA"


LOGGED_IN = """\
debug1: SSH2_MSG_SERVICE_ACCEPT received
debug1: Authentications that can continue: publickey
debug1: Next authentication method: publickey
debug1: Offering public key: op1 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
debug1: Server accepts key: op1 ED25519 SHA256:st6BPAFQeRsOncdO8isW1da9+q1ctufhFNUpY9uRVOw explicit
Authenticated to 10.250.70.2 ([10.250.70.2]:2222) using "publickey".
debug1: channel 0: new session [client-session] (inactive timeout: 0)
debug1: Requesting no-more-sessions@openssh.com
"""


# -- transcripts ---------------------------------------------------------------------------

def test_key_accepted_and_key_refused() -> None:
    t = parse_ssh_verbose(ACCEPTED_AND_REFUSED)
    assert t.reachable and t.connect_error == ""
    assert t.server_version == "OpenSSH_9.2p1 Debian-2+deb12u10"
    assert t.server_host_key == f"ssh-ed25519 {HOST_ED_FP}"
    assert t.host_key == "matches"
    assert t.auth_listed and t.auth_methods == ["publickey"]
    assert t.offered == [OP1_FP, OP2_FP]
    assert t.accepted == [OP1_FP]
    assert t.refused == [OP2_FP]
    assert not t.too_many_failures and not t.authenticated
    assert t.error == "root@10.250.70.2: Permission denied (publickey)."


def test_host_key_changed() -> None:
    t = parse_ssh_verbose(HOST_KEY_CHANGED)
    assert t.reachable
    assert t.host_key == "differs"
    assert t.server_host_key == f"ssh-ed25519 {HOST_ED_FP}"
    assert not t.auth_listed and t.offered == [] and t.accepted == []
    assert t.error == "Host key verification failed."


def test_no_host_key_known_for_the_address() -> None:
    t = parse_ssh_verbose(NO_HOST_KEY_KNOWN)
    assert t.host_key == "differs" and t.server_host_key == f"ssh-ed25519 {HOST_ED_FP}"


def test_max_auth_tries_disconnect_refuses_the_last_offered_key() -> None:
    t = parse_ssh_verbose(MAX_AUTH_TRIES)
    assert t.host_key == "matches"
    assert t.too_many_failures
    assert t.offered == [R1_FP, R2_FP]
    assert t.refused == [R1_FP, R2_FP]   # sshd disconnects after counting R2's failure
    assert t.accepted == []              # the fourth key (OP1) was never asked about


def test_password_and_keyboard_interactive_are_listed() -> None:
    t = parse_ssh_verbose(PASSWORD_ON)
    assert t.auth_methods == ["publickey", "password"] and t.accepted == [OP1_FP]
    t = parse_ssh_verbose(KBD_INTERACTIVE_ON)
    assert t.auth_methods == ["publickey", "keyboard-interactive"] and t.accepted == [OP1_FP]


def test_publickey_off_lists_no_methods_and_refuses() -> None:
    t = parse_ssh_verbose(PUBKEY_OFF)
    assert t.auth_listed and t.auth_methods == []
    assert t.refused == [OP1_FP] and t.accepted == []


@pytest.mark.parametrize(("text", "why"), [
    (CONNECTION_REFUSED, "Connection refused"),
    (CONNECT_TIMED_OUT, "Connection timed out"),
    (BANNER_TIMED_OUT, "no SSH banner (connection timed out during banner exchange)"),
    (CONNECTION_CLOSED, "kex_exchange_identification: Connection closed by remote host"),
])
def test_unreachable(text: str, why: str) -> None:
    t = parse_ssh_verbose(text)
    assert not t.reachable
    assert t.connect_error == why
    assert t.host_key == "" and not t.auth_listed


def test_a_banner_cannot_forge_lines() -> None:
    forged = parse_ssh_verbose(BANNER_FORGERY)  # without key_dir the forgery works
    assert BANNER_KEY_FP in forged.accepted
    t = parse_ssh_verbose(BANNER_FORGERY, key_dir="/tmp/exp/capb/")
    assert t.accepted == [] and t.refused == [BANNER_KEY_FP]
    assert t.offered == [BANNER_KEY_FP]
    assert t.server_host_key == f"ssh-ed25519 {BANNER_HOST_FP}" and t.host_key == "matches"


def test_key_dir_is_required_on_offer_lines() -> None:
    t = parse_ssh_verbose(ACCEPTED_AND_REFUSED, key_dir="/tmp/exp/capw")
    assert t.accepted == [OP1_FP] and t.refused == [OP2_FP]
    t = parse_ssh_verbose(ACCEPTED_AND_REFUSED, key_dir="/tmp/elsewhere")
    assert t.offered == [] and t.accepted == [] and t.refused == []


def test_login_is_noticed() -> None:
    t = parse_ssh_verbose(LOGGED_IN)
    assert t.authenticated and t.accepted == [OP1_FP]


def test_empty_output() -> None:
    t = parse_ssh_verbose("")
    assert not t.reachable and t.host_key == "" and t.error == ""


# -- keys, known_hosts, command line -------------------------------------------------------

def test_parse_public_key_and_fingerprints() -> None:
    for line, kind, fp in ((OP1, "ssh-ed25519", OP1_FP), (OP2, "ecdsa-sha2-nistp256", OP2_FP),
                           (HOST_ED, "ssh-ed25519", HOST_ED_FP),
                           (HOST_RSA, "ssh-rsa", HOST_RSA_FP)):
        key = parse_public_key(line)
        assert key is not None and key.kind == kind and key.fingerprint == fp
    assert parse_public_key(OP1 + "\n").comment == "op1@x"   # type: ignore[union-attr]
    opts = parse_public_key('from="10.0.0.0/8",no-pty ' + OP1)
    assert opts is not None and opts.fingerprint == OP1_FP and opts.comment == "op1@x"


@pytest.mark.parametrize("line", [
    "", "   ", "# comment", "ssh-ed25519", "ssh-ed25519 not-base64!",
    "ssh-rsa " + OP1.split()[1],                  # blob names another algorithm
    "ssh-ed25519 AAAA",                            # too short
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "ssh-ed25519-cert-v01@openssh.com AAAA",
])
def test_parse_public_key_rejects(line: str) -> None:
    assert parse_public_key(line) is None


def test_known_hosts_lines() -> None:
    keys = [parse_public_key(HOST_ED), parse_public_key(HOST_RSA)]
    assert all(keys)
    text = known_hosts("10.250.70.2", 2222, keys)  # type: ignore[arg-type]
    assert text == (f"[10.250.70.2]:2222 {HOST_ED.rsplit(' ', 1)[0]}\n"
                    f"[10.250.70.2]:2222 {HOST_RSA.rsplit(' ', 1)[0]}\n")
    assert known_hosts("10.0.0.5", 22, keys[:1]) == (  # type: ignore[arg-type]
        f"10.0.0.5 {HOST_ED.rsplit(' ', 1)[0]}\n")
    assert known_hosts("fd00::5", 2222, keys[:1]).startswith("[fd00::5]:2222 ssh-ed25519 ")  # type: ignore[arg-type]
    assert known_hosts("fd00::5", 22, keys[:1]).startswith("fd00::5 ssh-ed25519 ")  # type: ignore[arg-type]


def test_ssh_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cmd = ssh_command("10.0.0.5", 2222, "root", tmp_path / "kh", [tmp_path / "k0"], 7)
    assert cmd[:4] == [contract.SSH_BINARY, "-v", "-F", "/dev/null"]
    opts = {cmd[i + 1] for i, a in enumerate(cmd) if a == "-o"}
    for must in ("BatchMode=yes", "StrictHostKeyChecking=yes", "GlobalKnownHostsFile=/dev/null",
                 f"UserKnownHostsFile={tmp_path / 'kh'}", "IdentitiesOnly=yes",
                 "IdentityAgent=none", "PreferredAuthentications=publickey",
                 "PasswordAuthentication=no", "KbdInteractiveAuthentication=no",
                 "ConnectTimeout=7", "ProxyCommand=none", "ControlPath=none"):
        assert must in opts
    assert cmd[-9:] == ["-i", str(tmp_path / "k0"), "-l", "root", "-p", "2222", "--",
                        "10.0.0.5", "true"]


# -- input checks (no process runs) --------------------------------------------------------

@pytest.mark.parametrize(("address", "host_keys", "keys", "words"), [
    ("machine-1", [HOST_ED], [OP1], "not an IP address"),
    ("10.0.0.5", [], [OP1], "no SSH host keys"),
    ("10.0.0.5", ["garbage"], [OP1], "host key 1 is not an OpenSSH public key"),
    ("10.0.0.5", [HOST_ED], [], "no operator SSH keys"),
    ("10.0.0.5", [HOST_ED], ["", "# only a comment"], "no operator SSH keys"),
    ("10.0.0.5", [HOST_ED], [OP1, "ssh-ed25519 AAAA"], "operator key 2 is not"),
])
def test_invalid_input_is_a_failed_result(address: str, host_keys: list[str],
                                          keys: list[str], words: str) -> None:
    result = check_contract(address, host_keys, keys)
    assert not result.ok and words in result.reason
    assert result.checks["retryable"] is False and result.checks["input"] == "invalid"


@pytest.mark.parametrize("kw", [{"user": "-oProxyCommand=x"}, {"user": ""}, {"port": 0},
                                {"port": 70000}, {"timeout": 0}])
def test_programming_errors_raise(kw: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        check_contract("10.0.0.5", [HOST_ED], [OP1], **kw)


def test_missing_ssh_names_the_package(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(contract, "SSH_BINARY", str(tmp_path / "no-ssh"))
    with pytest.raises(SshClientMissing, match="openssh-client"):
        check_contract("10.0.0.5", [HOST_ED], [OP1])


def test_public_key_line_drops_options_and_comment() -> None:
    key = PublicKey("ssh-ed25519", OP1.split()[1], "op1@x")
    assert key.line() == " ".join(OP1.split()[:2])
