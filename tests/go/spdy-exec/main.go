// spdy-exec: runs an exec session against a CRI streaming URL the way
// kubectl and crictl do, on moby/spdystream (Debian's
// golang-github-docker-spdystream-dev, the SPDY library kubelet's clients
// use), with the v4.channel.k8s.io protocol. husk's tests use it to check
// that the streaming server interoperates with the Go implementation.
//
// Usage: spdy-exec [-i] [-t] URL
// stdin is sent when -i is given; output goes to stdout/stderr; the exit
// code is the remote command's (1 with a message for other failures).
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"

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

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "spdy-exec: "+format+"\n", a...)
	os.Exit(1)
}

func main() {
	stdin := flag.Bool("i", false, "send stdin")
	tty := flag.Bool("t", false, "allocate a terminal")
	flag.Parse()
	if flag.NArg() != 1 {
		fail("usage: spdy-exec [-i] [-t] URL")
	}
	u, err := url.Parse(flag.Arg(0))
	if err != nil {
		fail("%v", err)
	}
	conn, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	if err != nil {
		fail("%v", err)
	}
	req, _ := http.NewRequest("POST", u.String(), nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	req.Header.Add("X-Stream-Protocol-Version", "v4.channel.k8s.io")
	req.Header.Add("X-Stream-Protocol-Version", "v3.channel.k8s.io")
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
	if p := resp.Header.Get("X-Stream-Protocol-Version"); p != "v4.channel.k8s.io" {
		fail("negotiated %q", p)
	}
	if br.Buffered() > 0 {
		fail("data before the first frame")
	}
	sc, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("%v", err)
	}
	go sc.Serve(spdystream.NoOpStreamHandler)

	open := func(kind string) *spdystream.Stream {
		h := http.Header{}
		h.Set("streamType", kind)
		s, err := sc.CreateStream(h, nil, false)
		if err != nil {
			fail("creating the %s stream: %v", kind, err)
		}
		if err := s.WaitTimeout(30 * time.Second); err != nil {
			fail("waiting for the %s stream's reply: %v", kind, err)
		}
		return s
	}
	// The order remotecommand's v4 client uses.
	errStream := open("error")
	var wg sync.WaitGroup
	if *stdin {
		in := open("stdin")
		go func() {
			io.Copy(in, os.Stdin)
			in.Close()
		}()
	}
	out := open("stdout")
	wg.Add(1)
	go func() { defer wg.Done(); io.Copy(os.Stdout, out) }()
	if *tty {
		resize := open("resize")
		json.NewEncoder(resize).Encode(map[string]int{"Width": 100, "Height": 40})
	} else {
		errOut := open("stderr")
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(os.Stderr, errOut) }()
	}
	raw, err := io.ReadAll(errStream)
	if err != nil {
		fail("reading the error stream: %v", err)
	}
	wg.Wait()
	sc.Close()
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
				var code int
				fmt.Sscanf(c.Message, "%d", &code)
				os.Exit(code)
			}
		}
	}
	fail("%s", st.Message)
}
