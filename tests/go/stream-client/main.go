// stream-client: runs an exec or port-forward session against a CRI
// streaming URL the way kubectl and crictl do, on the Go libraries they
// use: moby/spdystream for SPDY (Debian's
// golang-github-docker-spdystream-dev) and gorilla/websocket for WebSocket
// (golang-github-gorilla-websocket-dev). husk's tests use it to check that
// the streaming server interoperates with those implementations; it is
// written for husk, following the protocols, not taken from client-go.
//
// Usage:
//
//	stream-client [-i] [-t] [-ws PROTOCOL] URL    exec
//	stream-client -port N [-ws] URL               port-forward one connection
//
// -ca FILE trusts that CA for https URLs.
//
// Exec sends stdin when -i is given and writes the output to stdout and
// stderr; the exit code is the remote command's (1 with a message for
// other failures). With -ws it speaks WebSocket with PROTOCOL
// (v5.channel.k8s.io, v4.base64.channel.k8s.io, ...), else SPDY with
// v4.channel.k8s.io. Port-forward copies stdin to the pod's port and the
// answer to stdout over SPDY, or SPDY tunnelled through WebSocket
// (SPDY/3.1+portforward.k8s.io) with -ws; an error from the server goes to
// stderr with exit code 1.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/moby/spdystream"
)

type status struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Reason  string `json:"reason"`
	Details struct {
		Causes []struct {
			Reason  string `json:"reason"`
			Message string `json:"message"`
		} `json:"causes"`
	} `json:"details"`
}

// tlsConfig is what https URLs are checked against (-ca).
var tlsConfig = &tls.Config{}

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "stream-client: "+format+"\n", a...)
	os.Exit(1)
}

func main() {
	stdin := flag.Bool("i", false, "send stdin")
	tty := flag.Bool("t", false, "allocate a terminal")
	ws := flag.String("ws", "", "WebSocket subprotocol (exec), any value: tunnel (port-forward)")
	port := flag.Int("port", 0, "port-forward to this port instead of exec")
	ca := flag.String("ca", "", "PEM file of the CA that signed the server's certificate (https)")
	flag.Parse()
	if *ca != "" {
		pem, err := os.ReadFile(*ca)
		if err != nil {
			fail("%v", err)
		}
		tlsConfig.RootCAs = x509.NewCertPool()
		if !tlsConfig.RootCAs.AppendCertsFromPEM(pem) {
			fail("no certificate in %s", *ca)
		}
	}
	if flag.NArg() != 1 {
		fail("usage: stream-client [-i] [-t] [-ws PROTOCOL] [-port N] URL")
	}
	u, err := url.Parse(flag.Arg(0))
	if err != nil {
		fail("%v", err)
	}
	if *port != 0 {
		var conn net.Conn
		if *ws != "" {
			conn = dialWebSocket(u, "SPDY/3.1+portforward.k8s.io")
		} else {
			conn = upgradeSPDY(u, "portforward.k8s.io")
		}
		portForward(conn, *port)
		return
	}
	if *ws != "" {
		exitWith(execWebSocket(u, *ws, *stdin, *tty))
	}
	exitWith(execSPDY(upgradeSPDY(u, "v4.channel.k8s.io"), *stdin, *tty), true)
}

// exitWith ends the process as the remote command did.
func exitWith(raw []byte, structured bool) {
	if !structured {
		if len(raw) == 0 {
			os.Exit(0)
		}
		fail("%s", raw)
	}
	var st status
	if err := json.Unmarshal(raw, &st); err != nil {
		fail("status %q: %v", raw, err)
	}
	if st.Status == "Success" {
		os.Exit(0)
	}
	if st.Reason == "NonZeroExitCode" {
		for _, c := range st.Details.Causes {
			if c.Reason == "ExitCode" {
				code, _ := strconv.Atoi(c.Message)
				os.Exit(code)
			}
		}
	}
	fail("%s", st.Message)
}

// upgradeSPDY sends the HTTP upgrade and returns the connection SPDY
// frames then flow on.
func upgradeSPDY(u *url.URL, protocol string) net.Conn {
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	var conn net.Conn
	var err error
	if u.Scheme == "https" {
		conn, err = tls.DialWithDialer(dialer, "tcp", u.Host, tlsConfig)
	} else {
		conn, err = dialer.Dial("tcp", u.Host)
	}
	if err != nil {
		fail("%v", err)
	}
	req, _ := http.NewRequest("POST", u.String(), nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	req.Header.Add("X-Stream-Protocol-Version", protocol)
	if err := req.Write(conn); err != nil {
		fail("%v", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		fail("%v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(resp.Body)
		fail("server answered %s: %s", resp.Status, body)
	}
	if p := resp.Header.Get("X-Stream-Protocol-Version"); p != protocol {
		fail("negotiated %q", p)
	}
	if br.Buffered() > 0 {
		fail("data before the first frame")
	}
	return conn
}

func spdyConn(conn net.Conn) (*spdystream.Connection, func(http.Header) *spdystream.Stream) {
	sc, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("%v", err)
	}
	go sc.Serve(spdystream.NoOpStreamHandler)
	open := func(h http.Header) *spdystream.Stream {
		s, err := sc.CreateStream(h, nil, false)
		if err != nil {
			fail("creating the %v stream: %v", h, err)
		}
		if err := s.WaitTimeout(30 * time.Second); err != nil {
			fail("waiting for the %v stream's reply: %v", h, err)
		}
		return s
	}
	return sc, open
}

func execSPDY(conn net.Conn, stdin, tty bool) []byte {
	sc, open := spdyConn(conn)
	stream := func(kind string) *spdystream.Stream {
		h := http.Header{}
		h.Set("streamType", kind)
		return open(h)
	}
	// The order remotecommand's v4 client uses.
	// All streams first, then the copying, as client-go does: the server
	// starts the process once every stream is open, and stdin sent before
	// that waits in a bounded queue.
	errStream := stream("error")
	var in, errOut, resize *spdystream.Stream
	if stdin {
		in = stream("stdin")
	}
	out := stream("stdout")
	if tty {
		resize = stream("resize")
	} else {
		errOut = stream("stderr")
	}
	var wg sync.WaitGroup
	if in != nil {
		go func() {
			io.Copy(in, os.Stdin)
			in.Close()
		}()
	}
	wg.Add(1)
	go func() { defer wg.Done(); io.Copy(os.Stdout, out) }()
	if resize != nil {
		json.NewEncoder(resize).Encode(map[string]int{"Width": 100, "Height": 40})
	}
	if errOut != nil {
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(os.Stderr, errOut) }()
	}
	raw, err := io.ReadAll(errStream)
	if err != nil {
		fail("reading the error stream: %v", err)
	}
	wg.Wait()
	sc.Close()
	return raw
}

func dialWebSocket(u *url.URL, protocol string) *wsConn {
	w := *u
	w.Scheme = strings.Replace(u.Scheme, "http", "ws", 1)
	d := websocket.Dialer{
		Subprotocols:     []string{protocol},
		HandshakeTimeout: 10 * time.Second,
		TLSClientConfig:  tlsConfig,
	}
	conn, resp, err := d.Dial(w.String(), nil)
	if err != nil {
		if resp != nil {
			body, _ := io.ReadAll(resp.Body)
			fail("server answered %s: %s", resp.Status, body)
		}
		fail("%v", err)
	}
	if conn.Subprotocol() != protocol {
		fail("negotiated %q", conn.Subprotocol())
	}
	return &wsConn{Conn: conn}
}

// execWebSocket runs the channel protocol: a first byte (or digit, for
// base64) naming the channel, stdin 0, stdout 1, stderr 2, error 3,
// resize 4; v5 closes stdin with [255, 0].
func execWebSocket(u *url.URL, protocol string, stdin, tty bool) ([]byte, bool) {
	c := dialWebSocket(u, protocol)
	b64 := strings.Contains(protocol, "base64")
	send := func(ch byte, data []byte) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if b64 {
			c.WriteMessage(websocket.TextMessage, []byte(string(rune('0'+ch))+base64.StdEncoding.EncodeToString(data)))
		} else {
			c.WriteMessage(websocket.BinaryMessage, append([]byte{ch}, data...))
		}
	}
	if tty {
		send(4, []byte(`{"Width":100,"Height":40}`))
	}
	if stdin {
		go func() {
			buf := make([]byte, 32*1024)
			for {
				n, err := os.Stdin.Read(buf)
				if n > 0 {
					send(0, buf[:n])
				}
				if err != nil {
					break
				}
			}
			if protocol == "v5.channel.k8s.io" {
				c.mu.Lock()
				c.WriteMessage(websocket.BinaryMessage, []byte{255, 0})
				c.mu.Unlock()
			}
		}()
	}
	var raw []byte
	for {
		mt, data, err := c.ReadMessage()
		if err != nil {
			if !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
				fail("reading: %v", err)
			}
			break
		}
		if len(data) == 0 {
			continue
		}
		ch := data[0]
		data = data[1:]
		if mt == websocket.TextMessage {
			ch -= '0'
			if data, err = base64.StdEncoding.DecodeString(string(data)); err != nil {
				fail("base64: %v", err)
			}
		}
		switch ch {
		case 1:
			os.Stdout.Write(data)
		case 2:
			os.Stderr.Write(data)
		case 3:
			raw = append(raw, data...)
		}
	}
	return raw, strings.HasPrefix(protocol, "v4.") || strings.HasPrefix(protocol, "v5.")
}

// wsConn is a net.Conn whose bytes travel as binary WebSocket messages,
// as client-go's tunnelling connection does.
type wsConn struct {
	*websocket.Conn
	mu      sync.Mutex
	current io.Reader
}

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.current == nil {
			mt, r, err := c.NextReader()
			if err != nil {
				if websocket.IsCloseError(err, websocket.CloseNormalClosure) {
					return 0, io.EOF
				}
				return 0, err
			}
			if mt != websocket.BinaryMessage {
				return 0, fmt.Errorf("message type %d", mt)
			}
			c.current = r
		}
		n, err := c.current.Read(p)
		if err == io.EOF {
			c.current = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// portForward forwards one connection the way kubectl does: an error
// and a data stream with the same requestID and port.
func portForward(conn net.Conn, port int) {
	sc, open := spdyConn(conn)
	stream := func(kind string) *spdystream.Stream {
		h := http.Header{}
		h.Set("streamType", kind)
		h.Set("port", strconv.Itoa(port))
		h.Set("requestID", "0")
		return open(h)
	}
	errStream := stream("error")
	errStream.Close()
	data := stream("data")
	go func() {
		io.Copy(data, os.Stdin)
		data.Close()
	}()
	done := make(chan struct{})
	go func() { io.Copy(os.Stdout, data); close(done) }()
	msg, _ := io.ReadAll(errStream)
	<-done
	sc.Close()
	if len(msg) > 0 {
		fail("%s", msg)
	}
}
