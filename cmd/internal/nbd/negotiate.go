package nbd

import (
	"encoding/binary"
	"fmt"
	"io"
	"time"
)

// negotiate runs the handshake and option haggling. On success the
// connection is bound to the returned export and in transmission.
func (c *conn) negotiate() (*export, error) {
	c.nc.SetDeadline(time.Now().Add(c.srv.handshakeTimeout))
	if c.stopping.Load() {
		return nil, errServerClose
	}

	var greeting [18]byte
	binary.BigEndian.PutUint64(greeting[0:], nbdMagic)
	binary.BigEndian.PutUint64(greeting[8:], ihaveoptMagic)
	binary.BigEndian.PutUint16(greeting[16:], serverHandshakeFlags)
	if _, err := c.nc.Write(greeting[:]); err != nil {
		return nil, fmt.Errorf("write greeting: %w", err)
	}

	var flagBuf [4]byte
	if _, err := io.ReadFull(c.br, flagBuf[:]); err != nil {
		return nil, c.readErr(err, "client flags")
	}
	clientFlags := binary.BigEndian.Uint32(flagBuf[:])
	if clientFlags&^knownClientFlags != 0 {
		// MUST close [Client flags]: the client expects a protocol
		// extension we do not speak.
		return nil, fmt.Errorf("unknown client flags %#x", clientFlags)
	}
	fixed := clientFlags&flagCFixedNewstyle != 0
	noZeroes := clientFlags&flagCNoZeroes != 0

	for n := 0; ; n++ {
		if n == maxOptions {
			return nil, fmt.Errorf("more than %d options", maxOptions)
		}
		var hdr [16]byte
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return nil, c.readErr(err, "option header")
		}
		if magic := binary.BigEndian.Uint64(hdr[0:]); magic != ihaveoptMagic {
			return nil, fmt.Errorf("bad option magic %#x", magic)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[12:])
		if length > maxOptionLength {
			return nil, fmt.Errorf("option %d data of %d bytes exceeds %d", opt, length, maxOptionLength)
		}
		if !fixed && opt != optExportName {
			// Without fixed newstyle there is no way to reply to
			// anything but EXPORT_NAME.
			return nil, fmt.Errorf("option %d from a client without fixed newstyle", opt)
		}

		switch opt {
		case optExportName:
			data, err := c.readOptionData(length)
			if err != nil {
				return nil, err
			}
			return c.exportName(string(data), noZeroes)
		case optAbort:
			if err := c.discard(int64(length)); err != nil {
				return nil, err
			}
			// The client may already have hung up; the ACK is a courtesy.
			c.sendOptReply(opt, repAck, nil)
			return nil, errAborted
		}

		// Read the data before deciding anything, so even a rejected
		// option leaves the stream at the next option header.
		var data []byte
		var err error
		switch opt {
		case optList, optInfo, optGo:
			data, err = c.readOptionData(length)
		default:
			err = c.discard(int64(length))
		}
		if err != nil {
			return nil, err
		}

		if c.srv.isShuttingDown() {
			err = c.sendOptReply(opt, repErrShut, []byte("server shutting down"))
		} else {
			switch opt {
			case optList:
				err = c.optList(data)
			case optInfo, optGo:
				var e *export
				e, err = c.optInfoGo(opt, data)
				if e != nil {
					return e, nil
				}
			default:
				c.log.Debug().Uint32("option", opt).Msg("nbd unsupported option")
				err = c.sendOptReply(opt, repErrUnsup, fmt.Appendf(nil, "option %d not supported", opt))
			}
		}
		if err != nil {
			return nil, err
		}
	}
}

func (c *conn) readOptionData(length uint32) ([]byte, error) {
	data := make([]byte, length)
	if _, err := io.ReadFull(c.br, data); err != nil {
		return nil, c.readErr(err, "option data")
	}
	return data, nil
}

func (c *conn) discard(n int64) error {
	if _, err := c.br.Discard(int(n)); err != nil {
		return c.readErr(err, "discarded data")
	}
	return nil
}

// sendOptReply writes one option reply [Fixed newstyle negotiation].
func (c *conn) sendOptReply(opt, typ uint32, data []byte) error {
	buf := make([]byte, 20+len(data))
	binary.BigEndian.PutUint64(buf[0:], optReplyMagic)
	binary.BigEndian.PutUint32(buf[8:], opt)
	binary.BigEndian.PutUint32(buf[12:], typ)
	binary.BigEndian.PutUint32(buf[16:], uint32(len(data)))
	copy(buf[20:], data)
	if _, err := c.nc.Write(buf); err != nil {
		return fmt.Errorf("write reply to option %d: %w", opt, err)
	}
	return nil
}

// exportName handles NBD_OPT_EXPORT_NAME, which has no error channel: any
// failure ends the session.
func (c *conn) exportName(name string, noZeroes bool) (*export, error) {
	if c.srv.isShuttingDown() {
		return nil, errServerClose
	}
	e, ok := c.srv.lookupAndBind(name, c, true)
	if !ok {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME for unknown export %q", name)
	}
	size, flags := c.transmissionInfo(e)
	reply := make([]byte, 10, 10+124)
	binary.BigEndian.PutUint64(reply[0:], size)
	binary.BigEndian.PutUint16(reply[8:], flags)
	if !noZeroes {
		reply = reply[:10+124]
	}
	if _, err := c.nc.Write(reply); err != nil {
		c.srv.unbind(e, c)
		return nil, fmt.Errorf("write export name reply: %w", err)
	}
	return c.enterTransmission(e, size)
}

// transmissionInfo is what NBD_INFO_EXPORT and the EXPORT_NAME reply carry.
func (c *conn) transmissionInfo(e *export) (size uint64, flags uint16) {
	flags = baseTransmissionFlags
	if e.ReadOnly {
		flags |= tflagReadOnly
	}
	return uint64(e.Backend.Size()), flags
}

func (c *conn) enterTransmission(e *export, size uint64) (*export, error) {
	c.exp = e
	c.quick, _ = e.Backend.(QuickBackend)
	c.acker, _ = e.Backend.(Acknowledger)
	c.size = size
	c.readOnly = e.ReadOnly
	c.nc.SetDeadline(time.Time{})
	if c.stopping.Load() {
		c.srv.unbind(e, c)
		return nil, errServerClose
	}
	return e, nil
}

// optList answers NBD_OPT_LIST with one NBD_REP_SERVER per export.
func (c *conn) optList(data []byte) error {
	if len(data) != 0 {
		return c.sendOptReply(optList, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
	}
	for _, e := range c.srv.exportList() {
		body := make([]byte, 4, 4+len(e.Name)+len(e.Description))
		binary.BigEndian.PutUint32(body, uint32(len(e.Name)))
		body = append(body, e.Name...)
		body = append(body, e.Description...)
		if err := c.sendOptReply(optList, repServer, body); err != nil {
			return err
		}
	}
	return c.sendOptReply(optList, repAck, nil)
}

// optInfoGo answers NBD_OPT_INFO and NBD_OPT_GO. For a successful GO it
// returns the export, bound to c; otherwise negotiation continues.
func (c *conn) optInfoGo(opt uint32, data []byte) (*export, error) {
	name, infos, ok := parseInfoRequest(data)
	if !ok {
		return nil, c.sendOptReply(opt, repErrInvalid, []byte("malformed NBD_OPT_INFO/NBD_OPT_GO data"))
	}
	isGo := opt == optGo
	e, found := c.srv.lookupAndBind(name, c, isGo)
	if !found {
		return nil, c.sendOptReply(opt, repErrUnknown, fmt.Appendf(nil, "export %q not found", name))
	}

	// NBD_INFO_EXPORT always goes first, asked for or not (qemu never
	// asks and fails without it). NBD_INFO_BLOCK_SIZE is always sent
	// too: it is cheap and lets libnbd learn our maximum payload.
	size, flags := c.transmissionInfo(e)
	replies := [][]byte{infoExportBody(size, flags), infoBlockSizeBody(uint32(c.srv.maxRequest))}
	for _, t := range infos {
		switch t {
		case infoName:
			replies = append(replies, infoStringBody(infoName, e.Name))
		case infoDescription:
			if e.Description != "" {
				replies = append(replies, infoStringBody(infoDescription, e.Description))
			}
		}
	}
	replies = append(replies, nil) // the final ACK
	for i, body := range replies {
		typ := uint32(repInfo)
		if i == len(replies)-1 {
			typ = repAck
		}
		if err := c.sendOptReply(opt, typ, body); err != nil {
			if isGo {
				c.srv.unbind(e, c)
			}
			return nil, err
		}
	}
	if !isGo {
		return nil, nil
	}
	return c.enterTransmission(e, size)
}

// parseInfoRequest decodes `u32 N, name, u16 K, K × u16 info type`; the
// lengths must add up exactly [NBD_OPT_INFO].
func parseInfoRequest(data []byte) (name string, infos []uint16, ok bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	n := uint64(binary.BigEndian.Uint32(data))
	if n > maxStringLength || uint64(len(data)) < 4+n+2 {
		return "", nil, false
	}
	name = string(data[4 : 4+n])
	rest := data[4+n:]
	k := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*k {
		return "", nil, false
	}
	infos = make([]uint16, k)
	for i := range infos {
		infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return name, infos, true
}

func infoExportBody(size uint64, flags uint16) []byte {
	b := make([]byte, 12)
	binary.BigEndian.PutUint16(b[0:], infoExport)
	binary.BigEndian.PutUint64(b[2:], size)
	binary.BigEndian.PutUint16(b[10:], flags)
	return b
}

func infoBlockSizeBody(maxPayload uint32) []byte {
	b := make([]byte, 14)
	binary.BigEndian.PutUint16(b[0:], infoBlockSize)
	binary.BigEndian.PutUint32(b[2:], minimumBlockSize)
	binary.BigEndian.PutUint32(b[6:], preferredBlockSize)
	binary.BigEndian.PutUint32(b[10:], maxPayload)
	return b
}

func infoStringBody(typ uint16, s string) []byte {
	b := make([]byte, 2, 2+len(s))
	binary.BigEndian.PutUint16(b, typ)
	return append(b, s...)
}
