package cluster

// The cluster port (gossip's port + 1) carries raft's RPCs, proposals
// forwarded to the leader, applied-index questions and window acks. Any
// of them, from a host outside the cluster, could decide for the cluster:
// a raft RPC can rewrite a follower's log, a forwarded proposal is
// applied as if a member had made it, a forged ack lets a merge proceed
// past a host that still writes. So when the cluster has a key (the
// gossip key, NodeConfig.GossipKey), every connection on that port is
// mutual TLS 1.3 keyed by it:
//
//   - Every host derives, from the key alone (HKDF-SHA256), one ed25519
//     key pair and a self-signed certificate for it. The derivation is
//     deterministic, so every host holds the same identity and there are
//     no certificates to issue, distribute, rotate or expire: whoever has
//     the key has the identity, and nobody else can make it.
//   - Both ends present that certificate and both refuse a peer whose
//     certificate's public key is not the derived one, byte for byte.
//     TLS proves the peer holds the matching private key, so a host
//     without the cluster key cannot speak raft, forward a proposal, ask
//     or answer an applied index, or ack a window: its connection ends at
//     the handshake, before the stream-kind byte is read.
//   - The stream-kind byte travels inside the TLS stream.
//   - The handshake has a deadline, so a silent peer cannot hold an
//     accept goroutine.
//
// Without a key the port stays plaintext and unauthenticated, as before;
// Node.Authenticated says which, so that `show` can warn.
//
// Cost: raft's transport pools its connections, so its RPCs pay for a
// handshake only when a connection is made. The short-lived streams
// (forwards, applied-index questions, acks) resume a TLS session when
// they can, which skips the signatures.

import (
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// transportInfo is HKDF's info string: it ties the derived identity to
// this use of the key (the same key encrypts gossip) and to this version
// of the derivation.
const transportInfo = "shadow cluster transport v1"

// handshakeTimeout bounds a TLS handshake plus the stream-kind byte on
// either side.
const handshakeTimeout = 5 * time.Second

// errWrongKey: the peer's certificate is not the one the cluster key
// derives.
var errWrongKey = errors.New("cluster: peer does not hold the cluster key")

// transport is the cluster port's authentication: nil means plaintext.
type transport struct {
	pub    ed25519.PublicKey
	server *tls.Config
	client *tls.Config
	log    zerolog.Logger

	// warned rate-limits refusal lines per remote host (raft redials a
	// refused peer often).
	warned struct {
		sync.Mutex
		at map[string]time.Time
	}
}

// transportIdentity derives the cluster's TLS identity from its key: the
// same key gives the same private key and the same certificate (DER) on
// every host.
func transportIdentity(key []byte) (ed25519.PrivateKey, tls.Certificate, error) {
	if len(key) == 0 {
		return nil, tls.Certificate{}, errors.New("cluster: transport: no key")
	}
	seed, err := hkdf.Key(sha256.New, key, nil, transportInfo, ed25519.SeedSize)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("cluster: transport key: %w", err)
	}
	priv := ed25519.NewKeyFromSeed(seed)
	// Fixed fields only: with ed25519 (deterministic signatures) every
	// host then makes the same certificate. The dates are far apart
	// because nothing checks them: the peer is identified by its public
	// key, not by a chain.
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "shadow cluster"},
		NotBefore:             time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	pub := priv.Public().(ed25519.PublicKey)
	der, err := x509.CreateCertificate(nil, tmpl, tmpl, pub, priv)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("cluster: transport certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("cluster: transport certificate: %w", err)
	}
	return priv, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv, Leaf: leaf}, nil
}

// newTransport makes the TLS configurations for a cluster key; a nil or
// empty key gives nil (plaintext).
func newTransport(key []byte, log zerolog.Logger) (*transport, error) {
	if len(key) == 0 {
		return nil, nil
	}
	priv, cert, err := transportIdentity(key)
	if err != nil {
		return nil, err
	}
	t := &transport{pub: priv.Public().(ed25519.PublicKey), log: log}
	t.warned.at = map[string]time.Time{}
	// X25519 alone: the default hybrid with ML-KEM-768 took about a third
	// of each handshake's CPU (and made the client send two key shares),
	// for protection against a future quantum computer decrypting traffic
	// recorded today, which on loopback only root can record.
	curves := []tls.CurveID{tls.X25519}
	t.server = &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: curves,
		Certificates:     []tls.Certificate{cert},
		// Any certificate, not a chain to a CA: verify checks its key.
		ClientAuth:       tls.RequireAnyClientCert,
		VerifyConnection: t.verify,
	}
	t.client = &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: curves,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &cert, nil
		},
		// No chain or host name to verify: verify compares the server's
		// public key with the cluster's, which is stricter.
		InsecureSkipVerify: true,
		VerifyConnection:   t.verify,
		// Forwards, applied-index questions and acks open a connection
		// each: resuming skips the signatures.
		ClientSessionCache: tls.NewLRUClientSessionCache(256),
	}
	return t, nil
}

// verify accepts a peer only if its leaf certificate carries the public
// key derived from the cluster key. It runs on both ends, on full
// handshakes and on resumptions.
func (t *transport) verify(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errWrongKey
	}
	pub, ok := cs.PeerCertificates[0].PublicKey.(ed25519.PublicKey)
	if !ok || len(pub) != len(t.pub) || subtle.ConstantTimeCompare(pub, t.pub) != 1 {
		return errWrongKey
	}
	return nil
}

// refused logs a connection refused at the handshake, naming the remote
// address, at most once every few seconds per remote host and side.
func (t *transport) refused(side string, remote string, err error) {
	host := remote
	if h, _, e := net.SplitHostPort(remote); e == nil && side == "accept" {
		host = h // the client's port changes with every connection
	}
	why := "TLS handshake failed (no cluster key, or not TLS)"
	switch {
	case errors.Is(err, errWrongKey), strings.Contains(err.Error(), "bad certificate"):
		// Ours refused its certificate, or it refused ours.
		why = "the peer does not hold the cluster key"
	case strings.Contains(err.Error(), "does not look like a TLS handshake"):
		why = "plaintext connection (no cluster key)"
	}
	key := side + " " + host + " " + why
	now := time.Now()
	t.warned.Lock()
	last, seen := t.warned.at[key]
	if seen && now.Sub(last) < 5*time.Second {
		t.warned.Unlock()
		return
	}
	t.warned.at[key] = now
	t.warned.Unlock()
	t.log.Warn().Err(err).Str("remote", remote).Str("side", side).Msg("cluster transport: refused a connection: " + why)
}

// dial opens a stream of the given kind to a host's cluster port: over
// mutual TLS when t is not nil, in plaintext otherwise. The kind byte is
// the first byte of the (TLS) stream.
func (t *transport) dial(addr string, kind byte, timeout time.Duration) (net.Conn, error) {
	if err := CheckLoopback(addr); err != nil {
		return nil, err
	}
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	if t == nil {
		if _, err := c.Write([]byte{kind}); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	hs := handshakeTimeout
	if timeout > 0 && timeout < hs {
		hs = timeout
	}
	_ = c.SetDeadline(time.Now().Add(hs))
	tc := tls.Client(c, t.client)
	if err := tc.Handshake(); err != nil {
		t.refused("dial", addr, err)
		c.Close()
		return nil, fmt.Errorf("cluster: TLS to %s: %w", addr, err)
	}
	if _, err := tc.Write([]byte{kind}); err != nil {
		tc.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return tc, nil
}

// accept reads the stream kind of a connection the mux accepted, after
// the TLS handshake when t is not nil, all within handshakeTimeout. It
// returns the connection to serve (the TLS one) or an error, having
// closed c.
func (t *transport) accept(c net.Conn) (net.Conn, byte, error) {
	_ = c.SetDeadline(time.Now().Add(handshakeTimeout))
	conn := c
	if t != nil {
		tc := tls.Server(c, t.server)
		if err := tc.Handshake(); err != nil {
			t.refused("accept", c.RemoteAddr().String(), err)
			c.Close()
			return nil, 0, err
		}
		conn = tc
	}
	var b [1]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		conn.Close()
		return nil, 0, err
	}
	_ = c.SetDeadline(time.Time{})
	return conn, b[0], nil
}
